"""The pure core: messages, identifiers, rules and the resolution algorithm. No I/O, no clock, no randomness."""
