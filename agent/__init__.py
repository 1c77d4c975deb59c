"""metering-agent: hourly AWS Marketplace MeterUsage reporting."""

__version__ = "0.1.0"
