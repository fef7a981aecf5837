"""The relay's view of the nodes behind it: who is primary and who may serve, from
the store and the agents (`topology`); the HTTP transport to the engines and how
its failures are classified (`transport`); the warmer that replays recent prompt
prefixes to the standby so a failover lands on a warm cache (`warming`)."""
