"""Emulated networks for swarm benchmarks: namespaces, shaped links and a delay line.

- `topology`: the namespaces (router, bootstrap, three hosts, client), their veth links with
  `tc tbf` rate limits, the iptables redirect into the relay, and process spawning inside
  them, always torn down;
- `relay`: the transparent TCP relay in the router namespace that delays each direction's
  bytes by half the round trip (this kernel has no `netem`);
- `probe`: what the emulation really gives (round trip by TCP echo, bandwidth by a bulk
  transfer), measured through the same path the product's traffic takes;
- `driver`: the swarm client's measurements, run as a process in the client namespace.

The product runs unchanged: real `swarm-bootstrap` / `swarm-host` processes over tcp, and
the client library; none of this is imported by `stamen`.
"""
