#!/usr/bin/env python3
"""Helper of tests/bench/scale.sh: writes flannel-format peer leases into etcd as other nodes
would, and watches one host's kernel to time when each write is in place.

    scale.py watch --out FILE --notify SOCK --marker FILE
        In the host's namespace: records every weft route (protocol 87), permanent neighbour and
        FDB change from rtnetlink, and READY=1 on a systemd notify socket, each datagram raw
        with its arrival time, until SIGTERM. The watcher only receives and stamps: the driver
        parses. 10,000 peers are 30,000 messages in well under a second, and parsing them as they
        come (~30 us each in Python) made the queue, and so the stamps, lag the kernel by 0.4 s.
    scale.py prefill --etcd URL --prefix P --backend B --n N [--underlay6 NET]
        Writes N peer leases (transactions of 1,000 puts); dual-stack ones with --underlay6, the
        /64 their PublicIPv6 come from.
    scale.py drive --etcd URL --prefix P --backend B --n N [--underlay6 NET] --events FILE ...
        Waits for the N prefilled peers (cold start), then idles and churns, and prints one JSON
        object of results.

Only the standard library: the etcd v3 JSON gateway (/v3/kv/put, /v3/kv/txn, /v3/kv/deleterange)
over plain HTTP, raw netlink sockets, AF_PACKET for the udp probes.
"""

import argparse
import base64
import errno
import http.client
import ipaddress
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

RTPROT_WEFT = 87
NUD_PERMANENT = 0x80
AF_BRIDGE = 7
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x4, 0x40, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR = 1, 2
SO_RCVBUFFORCE = 33
UDP_PORT = 8285
VNI = 1

# Peer i (1-based) leases subnet index i of 10.0.0.0/8 in /24s, and dual-stack also index i of
# NETWORK6 in /64s (both 16 bits of index: weftd's own lease lines up the same way). Its PublicIP
# and MAC come from counters, so a change can give a peer a fresh one.
NETWORK = ipaddress.ip_network("10.0.0.0/8")
NETWORK6 = ipaddress.ip_network("fd00::/48")
IP_BASE = int(ipaddress.ip_address("172.16.0.0"))


def subnet(i):
    return ipaddress.ip_network((int(NETWORK.network_address) + (i << 8), 24))


def subnet6(i):
    return ipaddress.ip_network((int(NETWORK6.network_address) + (i << 64), 64))


def public_ip(k):
    # 172.16.0.0/12 minus .0 and .255 of each /24.
    return str(ipaddress.ip_address(IP_BASE + (k // 254 << 8) + k % 254 + 1))


def public_ip6(k, base6):
    # The IPv4 PublicIP in the low 32 bits of the lab's underlay /64 (base6): on eth0's connected
    # network, as host-gw wants, and never a lab host's ::1N.
    return str(ipaddress.ip_address(base6 + int(ipaddress.ip_address(public_ip(k)))))


def mac(k):
    return "02:%02x:%02x:%02x:%02x:%02x" % (
        (k >> 32) & 255, (k >> 24) & 255, (k >> 16) & 255, (k >> 8) & 255, k & 255)


def mac6(k):
    # The VTEP of flannel-v6.<VNI>, another device than flannel.<VNI>: another MAC.
    return "06" + mac(k)[2:]


def key_of(prefix, net, net6=None):
    k = "%s/subnets/%s-%d" % (prefix, net.network_address, net.prefixlen)
    if net6 is not None:
        k += "&%s-%d" % (net6.network_address, net6.prefixlen)
    return k


def value_of(backend, p):
    v = {"PublicIP": p.ip, "PublicIPv6": p.ip6, "BackendType": backend}
    if backend == "vxlan":
        v["BackendData"] = {"VNI": VNI, "VtepMAC": p.mac}
        if p.dual:
            v["BackendV6Data"] = {"VNI": VNI, "VtepMAC": p.mac6}
    return json.dumps(v, separators=(",", ":"))


def underlay6(text):
    """--underlay6's /64 as a number, or None (IPv4 only)."""
    return int(ipaddress.ip_network(text).network_address) if text else None


def b64(s):
    return base64.b64encode(s.encode()).decode()


# ---------------------------------------------------------------------------------------------
# watch


def attrs(buf, off, end):
    out = {}
    while off + 4 <= end:
        ln, ty = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            break
        out[ty & 0x7FFF] = buf[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out


def ip4(b):
    return str(ipaddress.ip_address(b)) if len(b) == 4 else None


def ipaddr(b):
    """An IPv4 or IPv6 address attribute as text, else None."""
    return str(ipaddress.ip_address(b)) if len(b) in (4, 16) else None


def oif(a):
    return struct.unpack("=i", a[RTA_OIF])[0] if len(a.get(RTA_OIF, b"")) == 4 else 0


def machex(b):
    return ":".join("%02x" % x for x in b)


def parse(buf):
    """The lines one netlink datagram gives: route, neighbour and FDB changes weft makes, of
    either family, each with the device's ifindex last."""
    off = 0
    out = []
    while off + 16 <= len(buf):
        ln, ty, _fl, _seq, _pid = struct.unpack_from("=IHHII", buf, off)
        if ln < 16:
            break
        body, end = off + 16, off + ln
        if ty in (RTM_NEWROUTE, RTM_DELROUTE):
            fam, dlen, _s, _t, _tb, proto, _sc, _k, _f = struct.unpack_from("=BBBBBBBBI", buf, body)
            if proto == RTPROT_WEFT and fam in (socket.AF_INET, socket.AF_INET6):
                a = attrs(buf, body + 12, end)
                zero = bytes(4 if fam == socket.AF_INET else 16)
                dst = ipaddr(a.get(RTA_DST, zero))
                gw = ipaddr(a.get(RTA_GATEWAY, b"")) or "-"
                op = "R+" if ty == RTM_NEWROUTE else "R-"
                out.append("%s %s/%d %s %d" % (op, dst, dlen, gw, oif(a)))
        elif ty in (RTM_NEWNEIGH, RTM_DELNEIGH):
            fam, _p1, _p2, ifi, state, _fl2, _k = struct.unpack_from("=BBHiHBB", buf, body)
            a = attrs(buf, body + 12, end)
            dst, ll = a.get(NDA_DST), a.get(NDA_LLADDR)
            dst = ipaddr(dst) if dst is not None else None
            # A deleted permanent neighbour is reported as a new one in state FAILED, with no
            # link-layer address.
            plus = ty == RTM_NEWNEIGH and state & NUD_PERMANENT
            lladdr = machex(ll) if ll is not None and len(ll) == 6 else "-"
            if dst is None:
                pass
            elif fam in (socket.AF_INET, socket.AF_INET6):
                out.append("%s %s %s %d" % ("N+" if plus else "N-", dst, lladdr, ifi))
            elif fam == AF_BRIDGE and lladdr != "-":
                # An FDB entry; its remote (NDA_DST) is IPv6 on flannel-v6.<VNI>.
                out.append("%s %s %s %d" % ("F+" if plus else "F-", lladdr, dst, ifi))
        off += (ln + 3) & ~3
    return out


# One record per datagram: arrival time, what it is, its length; then its bytes.
RECORD = struct.Struct("=dBI")
NETLINK, NOTIFY, OVERRUN = 0, 1, 2


def cmd_watch(a):
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    nl.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)
    nl.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
    nl.setblocking(False)
    socks = {nl: NETLINK}
    if a.notify:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(a.notify)
        notify.setblocking(False)
        socks[notify] = NOTIFY
    out = open(a.out, "wb", buffering=1 << 20)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(a.marker, "w") as m:
        m.write("listening\n")
    while not stop:
        try:
            ready, _, _ = select.select(list(socks), [], [], 0.2)
        except InterruptedError:
            continue
        for s in ready:
            # Drained before the next select: one system call per datagram, nothing else.
            while True:
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        out.write(RECORD.pack(time.time(), OVERRUN, 0))
                        continue
                    raise
                out.write(RECORD.pack(time.time(), socks[s], len(data)))
                out.write(data)
        out.flush()
    out.close()


# ---------------------------------------------------------------------------------------------
# etcd


class Etcd:
    """The v3 JSON gateway over one keep-alive connection."""

    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 2379
        self.conn = None

    def call(self, path, body):
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                self.conn.request("POST", path, json.dumps(body),
                                  {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                if r.status != 200:
                    raise RuntimeError("%s: HTTP %d %s" % (path, r.status, data[:200]))
                return json.loads(data)
            except (OSError, http.client.HTTPException):
                self.conn = None
                if attempt == 2:
                    raise
        return None

    def put(self, key, value):
        return self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key):
        return self.call("/v3/kv/deleterange", {"key": b64(key)})

    def txn(self, ops):
        """ops: (key, value) puts and (key, None) deletes, in one revision."""
        success = []
        for k, v in ops:
            if v is None:
                success.append({"requestDeleteRange": {"key": b64(k)}})
            else:
                success.append({"requestPut": {"key": b64(k), "value": b64(v)}})
        return self.call("/v3/kv/txn", {"success": success})


def cmd_prefill(a):
    etcd = Etcd(a.etcd)
    base6 = underlay6(a.underlay6)
    ops = [(p.key(a.prefix), value_of(a.backend, p))
           for p in (Peer(i, i, i, base6) for i in range(1, a.n + 1))]
    for s in range(0, len(ops), 1000):
        etcd.txn(ops[s:s + 1000])


# ---------------------------------------------------------------------------------------------
# drive


class Kernel:
    """The host's weft state as the watcher's records tell it, read as the file grows."""

    def __init__(self, path):
        self.f = open(path, "rb")
        self.buf = b""
        self.routes = {}      # dst -> (gateway, ifindex)
        self.neigh = {}       # ip -> (mac, ifindex)
        self.fdb = {}         # mac -> {ip: ifindex}
        self.ready = None
        self.overruns = 0
        self.lines = 0

    def records(self):
        """The complete records written since the last call: (time, kind, bytes)."""
        chunk = self.f.read()
        if chunk:
            self.buf += chunk
        off, out = 0, []
        while off + RECORD.size <= len(self.buf):
            t, kind, ln = RECORD.unpack_from(self.buf, off)
            end = off + RECORD.size + ln
            if end > len(self.buf):
                break
            out.append((t, kind, self.buf[off + RECORD.size:end]))
            off = end
        self.buf = self.buf[off:]
        return out

    def poll(self):
        """The (time, key) of every object that changed since the last poll."""
        touched = []
        for t, kind, data in self.records():
            if kind == OVERRUN:
                self.overruns += 1
                continue
            if kind == NOTIFY:
                if b"READY=1" in data.split(b"\n"):
                    self.ready = self.ready or t
                continue
            for line in parse(data):
                self.lines += 1
                p = line.split()
                op, ifi = p[0], int(p[3])
                if op == "R+":
                    self.routes[p[1]] = (p[2], ifi)
                elif op == "R-":
                    if self.routes.get(p[1], ("",))[0] == p[2]:
                        del self.routes[p[1]]
                elif op == "N+":
                    self.neigh[p[1]] = (p[2], ifi)
                elif op == "N-":
                    if p[2] in ("-", self.neigh.get(p[1], ("",))[0]):
                        self.neigh.pop(p[1], None)
                elif op == "F+":
                    self.fdb.setdefault(p[1], {})[p[2]] = ifi
                elif op == "F-":
                    self.fdb.get(p[1], {}).pop(p[2], None)
                touched.append((t, p[1]))
        return touched


class Peer:
    """base6: the underlay /64 (a number) for a dual-stack peer, None for an IPv4-only one. One
    counter gives both families' PublicIP, one both MACs: a change changes both."""

    def __init__(self, idx, ipk, mack, base6=None):
        self.idx, self.ipk, self.mack, self.base6 = idx, ipk, mack, base6
        self.dual = base6 is not None
        self.net = subnet(idx)
        self.net6 = subnet6(idx) if self.dual else None

    def key(self, prefix):
        return key_of(prefix, self.net, self.net6)

    @property
    def ip(self):
        return public_ip(self.ipk)

    @property
    def mac(self):
        return mac(self.mack)

    @property
    def ip6(self):
        return public_ip6(self.ipk, self.base6) if self.dual else None

    @property
    def mac6(self):
        return mac6(self.mack) if self.dual else None


class Expect:
    """One write and the kernel state it must produce."""

    def __init__(self, kind, peer, t_write):
        self.kind, self.peer, self.t_write = kind, peer, t_write
        self.done = None


class Driver:
    def __init__(self, a):
        self.a = a
        self.backend = a.backend
        self.etcd = Etcd(a.etcd)
        self.kernel = Kernel(a.events)
        self.pending = {}     # watched object -> [Expect]
        self.open = 0
        self.base6 = underlay6(a.underlay6)
        self.peers = {i: Peer(i, i, i, self.base6) for i in range(1, a.n + 1)}
        self.busy = set()     # peers with a write still pending
        self.next_idx = a.n + 1
        self.next_ip = 1_000_000
        self.next_mac = 1_000_000
        self.own = None
        self.own6 = None
        self.devs = {}        # device name -> ifindex, looked up again on a mismatch
        self.rng = random.Random(11)
        self.probe = Probe(self) if self.backend == "udp" else None

    # What a peer's state is made of, per backend and family: (subnet, its network address,
    # VTEP MAC, PublicIP, device) for each family the peer has.
    def sides(self, p):
        vx = self.backend == "vxlan"
        out = [(p.net, p.mac, p.ip, "flannel.%d" % VNI if vx else "eth0")]
        if p.dual:
            out.append((p.net6, p.mac6, p.ip6, "flannel-v6.%d" % VNI if vx else "eth0"))
        return out

    # The objects to watch.
    def objects(self, p):
        out = []
        for net, m, _ip, _dev in self.sides(p):
            if self.backend == "vxlan":
                out += [str(net), str(net.network_address), m]
            elif self.backend == "host-gw":
                out.append(str(net))
        return out

    def on(self, ifindex, dev):
        """Whether ifindex is dev's."""
        if self.devs.get(dev) != ifindex:
            try:
                self.devs[dev] = socket.if_nametoindex(dev)
            except OSError:
                self.devs[dev] = None
        return self.devs[dev] == ifindex

    def satisfied(self, e):
        if self.backend not in ("vxlan", "host-gw"):
            return False  # udp: the probes decide
        k = self.kernel
        present = absent = True
        for net, m, ip, dev in self.sides(e.peer):
            dst, gw = str(net), str(net.network_address)
            if self.backend == "vxlan":
                r, n = k.routes.get(dst), k.neigh.get(gw)
                f = k.fdb.get(m, {})
                present = (present and r is not None and r[0] == gw and self.on(r[1], dev)
                           and n is not None and n[0] == m and self.on(n[1], dev)
                           and ip in f and self.on(f[ip], dev))
                absent = absent and dst not in k.routes and gw not in k.neigh and ip not in f
            else:
                r = k.routes.get(dst)
                present = present and r is not None and r[0] == ip and self.on(r[1], dev)
                absent = absent and dst not in k.routes
        return absent if e.kind == "del" else present

    def expect(self, kind, p, t_write):
        e = Expect(kind, p, t_write)
        self.busy.add(p.idx)
        self.open += 1
        if self.probe:
            self.probe.add(e)
            return e
        for o in self.objects(p):
            self.pending.setdefault(o, []).append(e)
        # Already in place (a watcher line read before the write was noted): checked at once.
        self.check(e, time.time())
        return e

    def check(self, e, t):
        if e.done is None and self.satisfied(e):
            self.finish(e, t)

    def finish(self, e, t):
        e.done = max(t, e.t_write)
        self.open -= 1
        self.busy.discard(e.peer.idx)
        for o in self.objects(e.peer):
            lst = self.pending.get(o)
            if lst and e in lst:
                lst.remove(e)
                if not lst:
                    del self.pending[o]

    def pump(self):
        for t, obj in self.kernel.poll():
            for e in list(self.pending.get(obj, ())):
                self.check(e, t)
        if self.probe:
            self.probe.round()

    def settle(self, expects, limit):
        deadline = time.time() + limit
        while any(e.done is None for e in expects):
            if time.time() > deadline:
                return False
            self.pump()
            time.sleep(0.001 if self.probe else 0.005)
        return True

    # --- writes ---

    def own_subnets(self):
        """This host's (IPv4, IPv6) subnets from subnet.env, None for those not there yet."""
        v4 = v6 = None
        if not os.path.exists(self.a.subnet_file):
            return v4, v6
        with open(self.a.subnet_file) as f:
            for line in f:
                name, _, val = line.strip().partition("=")
                if name == "FLANNEL_SUBNET":
                    v4 = ipaddress.ip_network(val, strict=False)
                elif name == "FLANNEL_IPV6_SUBNET":
                    v6 = ipaddress.ip_network(val, strict=False)
        return v4, v6

    def new_index(self):
        while True:
            i = self.next_idx
            self.next_idx += 1
            if subnet(i) != self.own and (self.base6 is None or subnet6(i) != self.own6):
                return i

    def pick(self):
        """A settled peer to change or delete."""
        for _ in range(1000):
            i = self.rng.randrange(1, self.next_idx)
            if i in self.peers and i not in self.busy:
                return self.peers[i]
        return None

    def op(self, kind):
        """The etcd op for `kind` (add, change, del) and the peer it leaves."""
        if kind == "add":
            i = self.new_index()
            p = Peer(i, self.next_ip, self.next_mac, self.base6)
            self.next_ip += 1
            self.next_mac += 1
        else:
            old = self.pick()
            if old is None:
                return None
            if kind == "change":
                # vxlan: a restarted flanneld's new VTEP MAC (dual-stack: both devices', both
                # new); others: a new PublicIP (dual-stack: a new PublicIPv6 too).
                if self.backend == "vxlan":
                    p = Peer(old.idx, old.ipk, self.next_mac, self.base6)
                    self.next_mac += 1
                else:
                    p = Peer(old.idx, self.next_ip, old.mack, self.base6)
                    self.next_ip += 1
            else:
                p = old
        k = p.key(self.a.prefix)
        v = None if kind == "del" else value_of(self.backend, p)
        return (k, v, p)

    def record(self, kind, p):
        if kind == "del":
            self.peers.pop(p.idx, None)
        else:
            self.peers[p.idx] = p

    # --- measurements ---

    def usage(self):
        try:
            with open("/proc/%d/stat" % self.a.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            rss = hwm = 0
            with open("/proc/%d/status" % self.a.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm = int(line.split()[1])
            threads = len(os.listdir("/proc/%d/task" % self.a.pid))
            return {"cpu": cpu, "rss_kib": rss, "hwm_kib": hwm, "threads": threads,
                    "t": time.time()}
        except OSError:
            return None

    def idle(self, secs):
        u0 = self.usage()
        end = time.time() + secs
        while time.time() < end:
            self.pump()
            time.sleep(0.05)
        u1 = self.usage()
        return span(u0, u1)

    def steady(self, rate, secs):
        kinds = ["add", "change", "del"]
        exps = []
        u0 = self.usage()
        start = time.time()
        n = int(rate * secs)
        for j in range(n):
            at = start + j / rate
            while time.time() < at:
                self.pump()
                time.sleep(min(0.001, max(0, at - time.time())))
            w = self.op(kinds[j % 3])
            if w is None:
                continue
            k, v, p = w
            t = time.time()
            if v is None:
                self.etcd.delete(k)
            else:
                self.etcd.put(k, v)
            self.record(kinds[j % 3], p)
            exps.append(self.expect(kinds[j % 3], p, t))
        last = max((e.t_write for e in exps), default=time.time())
        ok = self.settle(exps, 180)
        u1 = self.usage()
        # The changes alone: what one changed lease costs, the figure dual-stack is compared by.
        changes = [e for e in exps if e.kind == "change"]
        return summary(exps, last, ok) | {"usage": span(u0, u1), "ops": len(exps),
                                           "rate": len(exps) / max(1e-9, last - start),
                                           "change": summary(changes, last, ok)}

    def burst(self, kind, size, how):
        ws = []
        for _ in range(size):
            w = self.op(kind)
            if w is None:
                break
            ws.append(w)
            # Reserve the peer so the next pick cannot take it twice.
            self.busy.add(w[2].idx)
        u0 = self.usage()
        exps = []
        if how == "txn":
            t = time.time()
            self.etcd.txn([(k, v) for k, v, _ in ws])
            for k, v, p in ws:
                self.record(kind, p)
                exps.append(self.expect(kind, p, t))
        else:
            # Separate puts, each as another node would write it, from 8 connections at once.
            times = [0.0] * len(ws)

            def writer(lo):
                etcd = Etcd(self.a.etcd)
                for j in range(lo, len(ws), 8):
                    k, v, _ = ws[j]
                    times[j] = time.time()
                    if v is None:
                        etcd.delete(k)
                    else:
                        etcd.put(k, v)

            threads = [threading.Thread(target=writer, args=(lo,)) for lo in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for j, (k, v, p) in enumerate(ws):
                self.record(kind, p)
                exps.append(self.expect(kind, p, times[j]))
        last = max((e.t_write for e in exps), default=time.time())
        ok = self.settle(exps, 180)
        u1 = self.usage()
        return summary(exps, last, ok) | {"usage": span(u0, u1), "ops": len(exps)}

    def cold(self, t0):
        peers = list(self.peers.values())
        if self.probe and len(peers) > 200:
            # One table swap installs every peer: a sample (and the last key) stands for all.
            peers = self.rng.sample(peers[:-1], 199) + peers[-1:]
        exps = [self.expect("add", p, t0) for p in peers]
        ok = self.settle(exps, self.a.cold_limit)
        # READY may come after the peers (or before): wait for it a little.
        deadline = time.time() + 30
        while self.kernel.ready is None and time.time() < deadline:
            self.pump()
            time.sleep(0.01)
        done = max((e.done for e in exps if e.done), default=None)
        return {"ok": ok, "all_ms": ms(done - t0) if done and ok else None,
                "ready_ms": ms(self.kernel.ready - t0) if self.kernel.ready else None}


def span(u0, u1):
    if not u0 or not u1:
        return None
    wall = u1["t"] - u0["t"]
    return {"cpu_s": round(u1["cpu"] - u0["cpu"], 3), "wall_s": round(wall, 3),
            "cpu_pct": round(100 * (u1["cpu"] - u0["cpu"]) / max(wall, 1e-9), 2),
            "rss_kib": u1["rss_kib"], "hwm_kib": u1["hwm_kib"], "threads": u1["threads"]}


def ms(s):
    return round(s * 1000, 1)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 100)) - 1))]


def summary(exps, last_write, ok):
    lat = [e.done - e.t_write for e in exps if e.done is not None]
    done = [e.done for e in exps if e.done is not None]
    return {"ok": ok, "n": len(exps), "missing": len(exps) - len(lat),
            "p50_ms": ms(pct(lat, 50)) if lat else None,
            "p99_ms": ms(pct(lat, 99)) if lat else None,
            "max_ms": ms(max(lat)) if lat else None,
            "after_last_ms": ms(max(done) - last_write) if done and ok else None}


class Probe:
    """udp keeps its peers in userspace: a peer is in place when a datagram sent into its subnet
    leaves eth0 for its PublicIP (port 8285), and gone when the probe gets ICMP unreachable."""

    def __init__(self, d):
        self.d = d
        # ETH_P_ALL: only such taps see outgoing packets. SOCK_DGRAM: no link-layer header.
        self.cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))
        self.cap.bind(("eth0", 0))
        self.cap.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        self.cap.setblocking(False)
        self.open = {}   # probe target ip -> (Expect, socket)

    def add(self, e):
        target = str(e.peer.net.network_address + 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_IP, 11, 1)  # IP_RECVERR: ICMP errors reach recv
        s.setblocking(False)
        s.connect((target, 9))
        old = self.open.pop(target, None)
        if old:
            old[1].close()
        self.open[target] = (e, s)

    def round(self):
        for target, (e, s) in list(self.open.items()):
            if e.done is not None:
                continue
            try:
                s.send(b"weft-scale-probe")
            except OSError:
                pass
        time.sleep(0.0005)
        now = time.time()
        # Egress seen: the data plane sent the probe to the peer.
        while True:
            try:
                pkt, addr = self.cap.recvfrom(2048)
            except BlockingIOError:
                break
            if addr[1] != 0x0800 or len(pkt) < 28 + 20 or pkt[9] != 17:
                continue
            ihl = (pkt[0] & 15) * 4
            if struct.unpack_from("!H", pkt, ihl + 2)[0] != UDP_PORT:
                continue
            outer_dst = socket.inet_ntoa(pkt[16:20])
            inner = pkt[ihl + 8:]
            if len(inner) < 20:
                continue
            target = socket.inet_ntoa(inner[16:20])
            got = self.open.get(target)
            if got and got[0].kind != "del" and got[0].peer.ip == outer_dst:
                self.finish(target, now)
        # ICMP unreachable: no peer holds the subnet.
        for target, (e, s) in list(self.open.items()):
            if e.kind != "del" or e.done is not None:
                continue
            try:
                s.recv(64)
            except BlockingIOError:
                continue
            except OSError as err:
                if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED):
                    self.finish(target, now)

    def finish(self, target, t):
        e, s = self.open.pop(target)
        s.close()
        self.d.finish(e, t)


def cmd_drive(a):
    # Started before weftd, so udp's probes are already running when its peers arrive: weftd's
    # PID and start time come through files.
    deadline = time.time() + 60
    while not (os.path.getsize(a.start_file) if os.path.exists(a.start_file) else 0):
        if time.time() > deadline:
            sys.exit("no start file %s" % a.start_file)
        time.sleep(0.005)
    with open(a.start_file) as f:
        t0, pid = f.read().split()
    a.t0, a.pid = float(t0), int(pid)
    d = Driver(a)
    res = {"backend": a.backend, "n": a.n, "family": "dual" if a.underlay6 else "4"}
    res["cold"] = d.cold(a.t0)
    while time.time() < deadline + 60:
        d.own, d.own6 = d.own_subnets()
        if d.own is not None and (d.own6 is not None or not a.underlay6):
            break
        time.sleep(0.01)
    res["idle"] = d.idle(a.idle)
    res["steady"] = d.steady(a.rate, a.churn_secs)
    for kind in ("add", "change", "del"):
        res["txn_" + kind] = d.burst(kind, a.burst, "txn")
    for kind in ("add", "change", "del"):
        res["puts_" + kind] = d.burst(kind, a.burst, "puts")
    res["idle_after"] = d.idle(a.idle)
    res["watch_lines"] = d.kernel.lines
    res["overruns"] = d.kernel.overruns
    with open(a.out, "w") as f:
        f.write(json.dumps(res) + "\n")


def cmd_report(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]

    def f(v, unit=""):
        return "–" if v is None else ("%g%s" % (v, unit))

    def lat(r):
        if not r or not r.get("n"):
            return "–"
        s = "%s / %s / %s" % (f(r["p50_ms"]), f(r["p99_ms"]), f(r["max_ms"]))
        return s if r["ok"] else s + " (%d missing)" % r["missing"]

    def last(r):
        if not r or not r.get("n"):
            return "–"
        return f(r["after_last_ms"]) if r["ok"] else "%d missing" % r["missing"]

    def mib(kib):
        return "–" if kib is None else "%.1f" % (kib / 1024)

    def use(r, k):
        u = (r or {}).get("usage") if k is None else (r or {}).get(k)
        return u or {}

    def fam(r):
        return "IPv4" if r.get("family", "4") == "4" else "dual"

    # A case not run (udp dual-stack; a config the weftctl under test refuses): one row saying so.
    def skipped(r, cols):
        print("| %s | %s | %s | %d | skipped: %s |%s" % (
            r["label"], r["backend"], fam(r), r["n"], r["skipped"], " – |" * (cols - 5)))

    print("### Convergence (ms)")
    print()
    print("Latency from each etcd write to the kernel state: p50 / p99 / max. Bursts: the last "
          "peer in place after the last write, add / change / delete. dual: a peer is in place "
          "once the objects of both families are.")
    print()
    print("| weftd | backend | family | peers | READY=1 | cold start: all in place | 100/s churn | "
          "burst txn | burst puts | burst puts p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("skipped"):
            skipped(r, 10)
            continue
        c = r["cold"]
        txn = " / ".join(last(r.get("txn_" + k)) for k in ("add", "change", "del"))
        puts = " / ".join(last(r.get("puts_" + k)) for k in ("add", "change", "del"))
        p99 = " / ".join(f((r.get("puts_" + k) or {}).get("p99_ms")) for k in ("add", "change", "del"))
        print("| %s | %s | %s | %d | %s | %s | %s | %s | %s | %s |" % (
            r["label"], r["backend"], fam(r), r["n"], f(c["ready_ms"]),
            f(c["all_ms"]) if c["ok"] else "not all in %ds" % 180,
            lat(r["steady"]), txn, puts, p99))
    print()
    print("### Memory and CPU")
    print()
    print("RSS at the end of each phase; CPU as a share of one core over the phase (idle: "
          "--idle seconds after cold start, and again after the churn).")
    print()
    print("| weftd | backend | family | peers | RSS idle (MiB) | RSS after churn (MiB) | "
          "peak RSS (MiB) | threads | CPU idle | CPU idle after churn | CPU 100/s churn | "
          "CPU per burst of puts (s) | log lines | full passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("skipped"):
            skipped(r, 14)
            continue
        idle, after = r.get("idle") or {}, r.get("idle_after") or {}
        steady = use(r.get("steady"), None)
        burst = sum(use(r.get("puts_" + k), None).get("cpu_s", 0) for k in ("add", "change", "del"))
        full = r.get("full_passes")
        print("| %s | %s | %s | %d | %s | %s | %s | %s | %s%% | %s%% | %s%% | %.2f | %d | %s |" % (
            r["label"], r["backend"], fam(r), r["n"], mib(idle.get("rss_kib")),
            mib(after.get("rss_kib")), mib(after.get("hwm_kib")), f(idle.get("threads")),
            f(idle.get("cpu_pct")), f(after.get("cpu_pct")), f(steady.get("cpu_pct")),
            burst / 3, r["log_lines"], full if full else "–"))
    # The same case in both families, measured in this run: the cost of dual-stack.
    pairs = {}
    for r in rows:
        if not r.get("skipped"):
            pairs.setdefault((r["label"], r["backend"], r["n"]), {})[fam(r)] = r
    pairs = [(k, v) for k, v in pairs.items() if len(v) == 2]
    if pairs:
        print()
        print("### Dual-stack against IPv4 only")
        print()
        print("Each cell: IPv4 → dual. One change: a lease changed during the 100/s churn "
              "(p50 / p99, ms).")
        print()
        print("| weftd | backend | peers | cold start: all in place (ms) | one change p50 | "
              "one change p99 | RSS idle (MiB) | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|")

        def both(v, get):
            return "%s → %s" % (get(v["IPv4"]), get(v["dual"]))

        for (label, backend, n), v in pairs:
            print("| %s | %s | %d | %s | %s | %s | %s | %s |" % (
                label, backend, n,
                both(v, lambda r: f(r["cold"]["all_ms"]) if r["cold"]["ok"] else "not all"),
                both(v, lambda r: f(((r["steady"] or {}).get("change") or {}).get("p50_ms"))),
                both(v, lambda r: f(((r["steady"] or {}).get("change") or {}).get("p99_ms"))),
                both(v, lambda r: mib((r.get("idle") or {}).get("rss_kib"))),
                both(v, lambda r: mib((r.get("idle_after") or {}).get("hwm_kib")))))
    odd = [r for r in rows if r.get("overruns") or r.get("log_warnings")]
    for r in odd:
        print()
        print("Note: %s %s %s %d: %d watcher overruns, %d warning lines in weftd's log." % (
            r["label"], r["backend"], fam(r), r["n"], r.get("overruns", 0),
            r.get("log_warnings", 0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--out", required=True)
    w.add_argument("--notify")
    w.add_argument("--marker", required=True)
    for name in ("prefill", "drive"):
        p = sub.add_parser(name)
        p.add_argument("--etcd", required=True)
        p.add_argument("--prefix", required=True)
        p.add_argument("--backend", required=True, choices=["vxlan", "host-gw", "udp"])
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--underlay6", help="dual-stack peers, PublicIPv6 from this /64")
    d = sub.choices["drive"]
    d.add_argument("--events", required=True)
    d.add_argument("--start-file", required=True, help="weftd's start time and PID, when known")
    d.add_argument("--out", required=True, help="where the results go, as one JSON object")
    d.add_argument("--subnet-file", required=True)
    d.add_argument("--idle", type=float, default=35)
    d.add_argument("--rate", type=float, default=100)
    d.add_argument("--churn-secs", type=float, default=10)
    d.add_argument("--burst", type=int, default=500)
    d.add_argument("--cold-limit", type=float, default=180)
    r = sub.add_parser("report")
    r.add_argument("results")
    a = ap.parse_args()
    sys.setswitchinterval(0.0005)
    # One socket per udp probe.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    {"watch": cmd_watch, "prefill": cmd_prefill, "drive": cmd_drive,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
