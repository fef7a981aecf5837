"""`make failover-test`: inject real faults into the primary under load and measure."""
