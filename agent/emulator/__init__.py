"""A local MeterUsage + IMDSv2 service on 127.0.0.1, for sellers' offline trials and our tests:
a tool beside the agent, not part of its billing path (only `trial` and the `emulator` command
use it).

It speaks the real AWS JSON 1.1 protocol (`X-Amz-Target: AWSMPMeteringService.MeterUsage`, errors as
`__type`), so the agent's real boto3 client talks to it unchanged, and it keeps the service's rules:
the Timestamp is rounded down to the hour; one record per {caller, dimension, hour}; an identical
request returns the same MeteringRecordId and a different quantity gets DuplicateRequestException;
a ClientToken reused with other parameters gets IdempotencyConflictException; records more than
6 h old get TimestampOutOfBoundsException; a 10 requests/s token bucket throttles; UsageAllocations
are checked as the service checks them (`_check_allocations`) and kept with the record.
BatchMeterUsage keeps its own rules (`_batch_meter_usage`): per-record Status, a 24 h window and
the month-end cutoff, ProductCode only with legacy records, the `customers` setting.

Faults for tests are queued through `POST /_emulator/faults` (or `Emulator.inject`): `error` (any
code and HTTP status), `drop` (close the connection before recording), `lose` (record, then close
without answering), `slow` (answer after a delay). `Date` headers follow the emulator's clock;
`signature_window` refuses SigV4 dates that far off (a skewed client clock), and `imds_hang` makes
IMDS hold and drop every request (a slow first boot).

Containers (fixed paths; packaging/ci/container-check.sh relies on them):
- ECS task metadata v4: `ECS_CONTAINER_METADATA_URI_V4=<url>/ecs/v4`; `GET /ecs/v4/task` answers a
  `TaskARN` `arn:aws:ecs:<region>:111122223333:task/emulator-cluster/<task_id>` (settings), with
  `Cluster`, `Family`, `Revision`, `AvailabilityZone`; `GET /ecs/v4` the container's metadata.
- Task role credentials: `AWS_CONTAINER_CREDENTIALS_FULL_URI=<url>/ecs/credentials` (botocore allows
  http to loopback), AccessKeyId `ASIAEMULATORTASKROLE`.
- STS AssumeRoleWithWebIdentity (IRSA): `AWS_ENDPOINT_URL_STS=<url>`, with `AWS_ROLE_ARN` and
  `AWS_WEB_IDENTITY_TOKEN_FILE` (any token); `POST /` form `Action=AssumeRoleWithWebIdentity`,
  AccessKeyId `ASIAEMULATORIRSAROLE`.
- IMDS role credentials keep AccessKeyId `ASIAEMULATOREXAMPLE1` (the node's role in a container);
  `container_only: true` makes MeterUsage signed with it answer PlatformNotSupportedException, as
  AWS answers a node-role call from a task or pod.
Each of these is kept in `calls()` under its operation (TaskMetadata, ContainerCredentials,
AssumeRoleWithWebIdentity); a record's `Caller` is the access key that signed it.

RegisterUsage (`AWSMPMeteringService.RegisterUsage`) validates as the service does (ProductCode,
PublicKeyVersion >= 1 and known, Nonce <= 255 characters) and answers a PS256 JWT signed with an RSA
key pair the emulator makes on first use (`GET /_emulator/public_key` serves its PEM); settings
`entitled`, `authorized`, `rotation_timestamp` and `public_key_version` shape the answer, and faults
with `operation: RegisterUsage` inject errors. `cryptography` is imported only then.
ResolveCustomer answers for registration tokens made through `POST /_emulator/tokens` (or
`Emulator.issue_token`): each names one customer and expires on the emulator's clock
(InvalidTokenException for a token it never issued, ExpiredTokenException after its expiry).

Modules: `rules` (limits, records, settings, validation), `service` (state, MeterUsage,
RegisterUsage), `saas` (ResolveCustomer, BatchMeterUsage), `server` (HTTP, IMDS, ECS, STS).
This module is the front door: `from agent.emulator import Emulator, Settings`.
"""

from agent.emulator.rules import (
    ACCESS_KEY,
    IRSA_KEY,
    TASK_ROLE_KEY,
    Record,
    ServiceError,
    Settings,
    TokenBucket,
    _timestamp,
    b64url,
    sign_jwt,
)
from agent.emulator.server import Emulator

__all__ = [
    "ACCESS_KEY",
    "IRSA_KEY",
    "TASK_ROLE_KEY",
    "Emulator",
    "Record",
    "ServiceError",
    "Settings",
    "TokenBucket",
    "_timestamp",
    "b64url",
    "sign_jwt",
]
