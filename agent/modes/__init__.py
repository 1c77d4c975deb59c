"""The billing modes: one interface (`mode.Mode`), two implementations (`instance.InstanceMode`:
MeterUsage per instance hour; `saas.SaasMode`: BatchMeterUsage per customer), and the one place
that reads the config's `mode:` (`choose.mode_for`)."""
