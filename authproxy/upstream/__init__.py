"""The only code that talks to the upstream: forwarder, transport, tunnel and relay."""
