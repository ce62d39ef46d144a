"""Test hosts: network namespaces joined to this one by veth pairs (root only; torn down by ``close``)."""

from __future__ import annotations

import random
import subprocess
import uuid


def subnets(count: int) -> list[str]:
    """``count`` distinct /24 prefixes ("10.A.B") drawn at random, so test hosts of concurrent runs rarely meet."""
    seconds = random.sample(range(100, 250), count)
    return [f"10.{second}.{random.randrange(250)}" for second in seconds]


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=20)


class NetnsHost:
    """A network namespace joined to this one by a veth pair on its own /24: this namespace reaches it at
    ``address``; it reaches only this namespace (no route further, so no other such host; with ``default_route`` its
    packets to anywhere go to this namespace, which does not forward them)."""

    def __init__(self, subnet: str, default_route: bool = False) -> None:
        tag = uuid.uuid4().hex[:6]
        self.namespace, self.outer, inner = f"ssh-{tag}", f"svo-{tag}", f"svi-{tag}"
        self.address = f"{subnet}.2"
        self.gateway = f"{subnet}.1"  # this namespace's end of the pair: the test host reaches this one there
        try:
            _run("ip", "netns", "add", self.namespace)
            _run("ip", "link", "add", self.outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", self.namespace)
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outer)
            _run("ip", "link", "set", self.outer, "up")
            for command in (["addr", "add", f"{self.address}/24", "dev", inner], ["link", "set", inner, "up"]):
                _run(*self.prefix, "ip", *command)
            _run(*self.prefix, "ip", "link", "set", "lo", "up")
            if default_route:  # its packets to anywhere leave through this namespace (which forwards none)
                _run(*self.prefix, "ip", "route", "add", "default", "via", self.gateway)
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def set_link(self, up: bool) -> None:
        """Takes this host's link to the test host down (every packet between them vanishes: connections
        already open are not told) or brings it back up."""
        _run("ip", "link", "set", self.outer, "up" if up else "down")

    def link_to(self, other: NetnsHost, subnet: str) -> None:
        """A veth pair of its own between this host and ``other`` on ``subnet``, and a route each way between their
        ``address``es over it: where a default route to this namespace (which forwards nothing) dropped their packets
        silently, they now flow."""
        tag = uuid.uuid4().hex[:6]
        here, there = f"sva-{tag}", f"svb-{tag}"
        pair = ("type", "veth", "peer", "name", there, "netns", other.namespace)
        _run("ip", "link", "add", here, "netns", self.namespace, *pair)
        for host, device, own, peer, far in ((self, here, 1, 2, other), (other, there, 2, 1, self)):
            _run(*host.prefix, "ip", "addr", "add", f"{subnet}.{own}/24", "dev", device)
            _run(*host.prefix, "ip", "link", "set", device, "up")
            _run(*host.prefix, "ip", "route", "add", f"{far.address}/32", "via", f"{subnet}.{peer}")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=20)  # and its veth
