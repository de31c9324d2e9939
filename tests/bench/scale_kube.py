#!/usr/bin/env python3
"""Helper of tests/bench/scale-kube.sh: the Kubernetes-mode side of tests/bench/scale.py. Nodes
are written into a real kube-apiserver as other nodes' flanneld would publish them, and one
host's kernel is watched (scale.py's watcher and its Kernel, Driver and summaries, reused) to time
when each write is in place.

    scale_kube.py prefill --api URL --ca CA --token-file F --backend B --n N --shape S --out FILE
        As the admin: this host's own Node (a podCIDR, no flannel annotations yet), then N peer
        Nodes with podCIDRs 10.x.y.0/24 and flannel's annotations, from --conns connections at
        once. Prints nothing; FILE gets the time it took (not part of the result).
    scale_kube.py list --api URL --ca CA --token-file F --out FILE
        As weft's identity: the node list in weftd's pages (WEFTD_PAGE Nodes), as weftd reads it, timed (--repeat
        times); its size in bytes.
    scale_kube.py apiwatch --api URL --ca CA --token-file F (admin) --out FILE --marker FILE
        The bench's own watch on every Node, each event stamped on arrival: where a write's
        latency splits into the API's part and weftd's.
    scale_kube.py drive --api URL --ca CA --token-file F (admin) --audit FILE --user U ...
        Waits for weftd's start file, then: cold start (every peer in the kernel), idle, kubelet
        heartbeats, changes, deletes and adds at --rate, a burst of changes from 8 connections,
        idle again; then counts weft's API requests per phase from the apiserver's audit log.
        Writes one JSON object of results.
    scale_kube.py report RESULTS
        Markdown tables.

Only the standard library: HTTPS (verified against the lab CA) with a bearer token.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import resource
import signal
import ssl
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ left in the repository
import scale  # noqa: E402  (the etcd bench: its watcher's Kernel, Driver, Peer, summaries)

PREFIX = "flannel.alpha.coreos.com"
SMP = "application/strategic-merge-patch+json"
# The bench's own requests as weft's identity (the timed list) are told from weftd's by this.
BENCH_AGENT = "weft-scale-bench"
# Nodes per page of weftd's listing (PAGE in src/registry/kube/mod.rs).
WEFTD_PAGE = 100
# This host's Node leases the network's last /24; peers take 1..N and churn adds after them.
OWN_NAME = "bench-self"
OWN_INDEX = 65535


def node_name(i):
    return "node-%05d" % i


def cidr(i):
    return str(scale.subnet(i))


def flannel_annotations(backend, ip, mac):
    data = (json.dumps({"VNI": scale.VNI, "VtepMAC": mac}, separators=(",", ":"))
            if backend == "vxlan" else "null")
    return {PREFIX + "/kube-subnet-manager": "true", PREFIX + "/backend-type": backend,
            PREFIX + "/backend-data": data, PREFIX + "/public-ip": ip}


def hexid(i, salt, n):
    return hashlib.sha256(("%s-%d" % (salt, i)).encode()).hexdigest()[:n]


def uuid(i, salt):
    h = hexid(i, salt, 32)
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


# What a kubelet reports about the images on its node (up to 50): the DaemonSets' and a few
# workloads', the same on every node.
IMAGES = [
    ("registry.k8s.io/kube-proxy", "v1.20.2", 49_545_397),
    ("docker.io/weft/weft", "0.1.0", 9_210_112),
    ("registry.k8s.io/pause", "3.2", 299_513),
    ("registry.k8s.io/coredns", "1.7.0", 13_982_350),
    ("quay.io/prometheus/node-exporter", "v1.3.1", 10_347_719),
    ("docker.io/fluent/fluent-bit", "1.8.12", 32_115_210),
    ("registry.k8s.io/metrics-server/metrics-server", "v0.5.2", 25_802_119),
    ("registry.k8s.io/ingress-nginx/controller", "v1.1.1", 105_417_023),
    ("docker.io/library/nginx", "1.21.6", 56_746_778),
    ("docker.io/library/redis", "6.2.6", 40_142_560),
    ("docker.io/library/postgres", "14.2", 138_420_112),
    ("quay.io/jetstack/cert-manager-controller", "v1.7.1", 16_452_031),
    ("quay.io/jetstack/cert-manager-webhook", "v1.7.1", 13_803_444),
    ("quay.io/jetstack/cert-manager-cainjector", "v1.7.1", 12_050_901),
    ("registry.k8s.io/sig-storage/csi-node-driver-registrar", "v2.5.0", 9_132_630),
    ("registry.k8s.io/sig-storage/livenessprobe", "v2.6.0", 8_540_219),
    ("docker.io/grafana/promtail", "2.4.2", 72_950_210),
    ("docker.io/istio/proxyv2", "1.13.1", 94_222_341),
    ("docker.io/library/busybox", "1.35", 772_788),
    ("ghcr.io/example/app-frontend", "2022.03.1", 48_120_911),
    ("ghcr.io/example/app-backend", "2022.03.1", 85_771_234),
    ("ghcr.io/example/app-worker", "2022.03.1", 85_771_002),
    ("docker.io/library/python", "3.10-slim", 45_810_224),
    ("docker.io/library/golang", "1.17", 315_201_120),
    ("docker.io/bitnami/kubectl", "1.20.2", 72_119_408),
]


def kubelet_fields(node, i, name, ip):
    """What a kubelet registers beside the spec: labels, its annotations, and a status with
    addresses, capacity, conditions, images and nodeInfo (the apiserver lets a Node be created
    with its status, as kubelets do). ~10 KB a node in the list, as real ones are."""
    node["metadata"]["labels"] = {
        "beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/instance-type": "n2-standard-8",
        "failure-domain.beta.kubernetes.io/region": "europe-west1",
        "failure-domain.beta.kubernetes.io/zone": "europe-west1-%s" % "bcd"[i % 3],
        "kubernetes.io/arch": "amd64", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "n2-standard-8",
        "topology.kubernetes.io/region": "europe-west1",
        "topology.kubernetes.io/zone": "europe-west1-%s" % "bcd"[i % 3],
    }
    node["metadata"].setdefault("annotations", {}).update({
        "node.alpha.kubernetes.io/ttl": "0",
        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
    })
    node["spec"]["providerID"] = "gce://bench-project/europe-west1-b/%s" % name
    now = "2022-03-01T10:00:00Z"

    def cond(t, status, reason, msg):
        return {"type": t, "status": status, "lastHeartbeatTime": now,
                "lastTransitionTime": now, "reason": reason, "message": msg}

    res = {"cpu": "8", "ephemeral-storage": "98831908Ki", "hugepages-1Gi": "0",
           "hugepages-2Mi": "0", "memory": "32880336Ki", "pods": "110"}
    node["status"] = {
        "addresses": [{"type": "InternalIP", "address": ip},
                      {"type": "Hostname", "address": name}],
        "capacity": res,
        "allocatable": dict(res, cpu="7910m", memory="29624836Ki",
                            **{"ephemeral-storage": "47093746742"}),
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                 "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure",
                 "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID",
                 "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady",
                 "kubelet is posting ready status. AppArmor enabled"),
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "images": [{"names": ["%s@sha256:%s" % (repo, hexid(k, repo, 64)),
                              "%s:%s" % (repo, tag)], "sizeBytes": size}
                   for k, (repo, tag, size) in enumerate(IMAGES)],
        "nodeInfo": {
            "architecture": "amd64", "bootID": uuid(i, "boot"),
            "containerRuntimeVersion": "containerd://1.4.13",
            "kernelVersion": "5.10.0-11-cloud-amd64", "kubeProxyVersion": "v1.20.2",
            "kubeletVersion": "v1.20.2", "machineID": hexid(i, "machine", 32),
            "operatingSystem": "linux", "osImage": "Debian GNU/Linux 11 (bullseye)",
            "systemUUID": uuid(i, "system"),
        },
    }


def node_object(i, name, shape, annotations, ip):
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr(i), "podCIDRs": [cidr(i)]}}
    if annotations:
        node["metadata"]["annotations"] = dict(annotations)
    if shape == "kubelet":
        kubelet_fields(node, i, name, ip)
    return node


def peer_node(backend, shape, p):
    return node_object(p.idx, node_name(p.idx), shape,
                       flannel_annotations(backend, p.ip, p.mac), p.ip)


# ---------------------------------------------------------------------------------------------
# the API


class ApiError(RuntimeError):
    def __init__(self, status, what):
        super().__init__(what)
        self.status = status


class Kube:
    """The API over one keep-alive HTTPS connection, TLS verified against the lab's CA."""

    def __init__(self, a, token_file=None, agent=BENCH_AGENT):
        u = urllib.parse.urlparse(a.api)
        self.host, self.port = u.hostname, u.port or 443
        with open(token_file or a.token_file) as f:
            self.token = f.read().strip()
        self.ctx = ssl.create_default_context(cafile=a.ca)
        self.agent = agent
        self.conn = None

    def call(self, method, path, body=None, ctype="application/json", ok=(200, 201)):
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Authorization": "Bearer " + self.token, "Accept": "application/json",
                   "User-Agent": self.agent}
        if data is not None:
            headers["Content-Type"] = ctype
        for attempt in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=120,
                                                            context=self.ctx)
                self.conn.request(method, path, data, headers)
                r = self.conn.getresponse()
                out = r.read()
            except (OSError, http.client.HTTPException):
                self.conn = None
                if attempt == 2:
                    raise
                continue
            if r.status in ok:
                return out
            if r.status in (429, 500, 503) and attempt < 2:
                time.sleep(0.5)
                continue
            raise ApiError(r.status, "%s %s: HTTP %d %s" % (method, path, r.status, out[:300]))
        return None


def parallel(conns, items, work):
    """work(kube_index, item) for every item, from `conns` threads, striped; the first error is
    raised."""
    errors = []

    def run(lo):
        try:
            for j in range(lo, len(items), conns):
                if errors:
                    return
                work(lo, items[j])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(lo,)) for lo in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


def cmd_prefill(a):
    kubes = [Kube(a) for _ in range(a.conns)]
    sent = [0] * a.conns
    own = node_object(OWN_INDEX, OWN_NAME, a.shape, None, a.own_ip)
    t0 = time.time()
    kubes[0].call("POST", "/api/v1/nodes", own)
    peers = [scale.Peer(i, i, i) for i in range(1, a.n + 1)]

    def create(k, p):
        body = peer_node(a.backend, a.shape, p)
        sent[k] += len(json.dumps(body, separators=(",", ":")))
        # A create retried after a lost answer may find its node made.
        kubes[k].call("POST", "/api/v1/nodes", body, ok=(201, 409))

    parallel(a.conns, peers, create)
    secs = time.time() - t0
    with open(a.out, "w") as f:
        json.dump({"n": a.n, "secs": round(secs, 2), "per_sec": round((a.n + 1) / secs, 1),
                   "conns": a.conns, "bytes_sent_per_node": round(sum(sent) / max(1, a.n))}, f)


def list_nodes(kube, page=None):
    """One paged listing as weftd reads it: (seconds, bytes, items, pages)."""
    page = page or WEFTD_PAGE
    t0 = time.time()
    nbytes = items = pages = 0
    cont = None
    while True:
        path = "/api/v1/nodes?limit=%d" % page
        if cont:
            path += "&continue=" + urllib.parse.quote(cont, safe="")
        body = kube.call("GET", path)
        nbytes += len(body)
        pages += 1
        d = json.loads(body)
        items += len(d.get("items") or [])
        cont = (d.get("metadata") or {}).get("continue")
        if not cont:
            break
    return time.time() - t0, nbytes, items, pages


def cmd_list(a):
    kube = Kube(a, agent=BENCH_AGENT + "-list")
    runs = [list_nodes(kube) for _ in range(a.repeat)]
    secs = sorted(r[0] for r in runs)
    _, nbytes, items, pages = runs[-1]
    with open(a.out, "w") as f:
        json.dump({"items": items, "pages": pages, "bytes": nbytes,
                   "bytes_per_node": round(nbytes / max(1, items)),
                   "ms": [scale.ms(s) for s in (r[0] for r in runs)],
                   "ms_min": scale.ms(secs[0]), "ms_median": scale.ms(secs[len(secs) // 2])}, f)


# ---------------------------------------------------------------------------------------------
# drive


def stamp(s):
    """An RFC 3339 time with a zone (audit log, weftd's log lines) as a Unix time."""
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class KubeDriver(scale.Driver):
    """scale.Driver's expectations and kernel bookkeeping, with Node writes instead of etcd's."""

    def __init__(self, a):
        # scale.Driver.__init__ wants an etcd: everything else it sets up, set up here.
        self.a = a
        # Driver.op also names the peer's etcd key and value, unused here.
        a.prefix = "/coreos.com/network"
        self.backend = a.backend
        self.kernel = scale.Kernel(a.events)
        self.pending = {}
        self.open = 0
        self.peers = {i: scale.Peer(i, i, i) for i in range(1, a.n + 1)}
        self.busy = set()
        self.next_idx = a.n + 1
        self.next_ip = 1_000_000
        self.next_mac = 1_000_000
        self.own = scale.subnet(OWN_INDEX)
        # IPv4 only: Driver's dual-stack state, unused.
        self.base6 = self.own6 = None
        self.devs = {}
        self.rng = random.Random(11)
        self.probe = scale.Probe(self) if self.backend == "udp" else None
        self.kube = Kube(a)
        self.phases = {}
        # Every measured phase's expectations, in order: split into the API's part and weftd's
        # once the bench's own watch is read (split_latency).
        self.measured = []
        # Changes to weft's own kernel objects (routes and neighbours in the network, FDB
        # entries), counted while not None: the underlay's ARP entries change with API traffic.
        self.weft_changes = None

    def pump(self):
        for t, obj in self.kernel.poll():
            if self.weft_changes is not None and (obj.startswith("10.") or ":" in obj):
                self.weft_changes += 1
            for e in list(self.pending.get(obj, ())):
                self.check(e, t)
        if self.probe:
            self.probe.round()

    def write(self, kube, kind, p):
        """One Node write; the resourceVersion it made (None for a delete, whose answer is a
        Status: the API watch matches deletes by name)."""
        if kind == "del":
            kube.call("DELETE", "/api/v1/nodes/" + node_name(p.idx))
            return None
        if kind == "add":
            out = kube.call("POST", "/api/v1/nodes", peer_node(self.backend, self.a.shape, p))
        else:
            # As a peer's flanneld publishes: a strategic-merge patch of its Node's status.
            out = kube.call("PATCH", "/api/v1/nodes/%s/status" % node_name(p.idx),
                            {"metadata": {"annotations":
                                          flannel_annotations(self.backend, p.ip, p.mac)}}, SMP)
        return json.loads(out)["metadata"]["resourceVersion"]

    def phase(self, name, fn, *args):
        t = time.time()
        out = fn(*args)
        self.phases[name] = (t, time.time())
        return out

    def steady_kind(self, kind, count, rate):
        exps = []
        u0 = self.usage()
        start = time.time()
        for j in range(count):
            at = start + j / rate
            while time.time() < at:
                self.pump()
                time.sleep(min(0.001, max(0, at - time.time())))
            w = self.op(kind)
            if w is None:
                continue
            p = w[2]
            t = time.time()
            rv = self.write(self.kube, kind, p)
            self.record(kind, p)
            e = self.expect(kind, p, t)
            e.rv = rv
            exps.append(e)
        last = max((e.t_write for e in exps), default=time.time())
        ok = self.settle(exps, 180)
        u1 = self.usage()
        self.measured.append(exps)
        return scale.summary(exps, last, ok) | {"usage": scale.span(u0, u1), "ops": len(exps),
                                                "rate": len(exps) / max(1e-9, last - start)}

    def burst_changes(self, size, conns=8):
        ws = []
        for _ in range(size):
            w = self.op("change")
            if w is None:
                break
            ws.append(w[2])
            self.busy.add(w[2].idx)
        kubes = [Kube(self.a) for _ in range(conns)]
        for k in kubes:
            # Connected before the clock starts: the burst is the writes, not TLS handshakes.
            k.call("GET", "/api/v1/nodes/" + OWN_NAME)
        times, rvs = {}, {}
        u0 = self.usage()

        def change(k, p):
            times[p.idx] = time.time()
            rvs[p.idx] = self.write(kubes[k], "change", p)

        parallel(conns, ws, change)
        exps = []
        for p in ws:
            self.record("change", p)
            e = self.expect("change", p, times[p.idx])
            e.rv = rvs[p.idx]
            exps.append(e)
        last = max((e.t_write for e in exps), default=time.time())
        ok = self.settle(exps, 180)
        u1 = self.usage()
        self.measured.append(exps)
        return scale.summary(exps, last, ok) | {"usage": scale.span(u0, u1), "ops": len(exps)}

    def heartbeats(self, secs, rate):
        """Kubelets' node status updates (every 5 minutes each when nothing changes): Node events
        weftd receives and must not act on. Returns what the kernel saw meanwhile."""
        u0 = self.usage()
        self.weft_changes = 0
        start = time.time()
        n = int(secs * rate)
        sent = 0
        nodes = sorted(self.peers)
        for j in range(n):
            at = start + j / rate
            while time.time() < at:
                self.pump()
                time.sleep(min(0.005, max(0, at - time.time())))
            i = self.rng.choice(nodes)
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.kube.call("PATCH", "/api/v1/nodes/%s/status" % node_name(i),
                           {"status": {"conditions": [{"type": "Ready",
                                                       "lastHeartbeatTime": now}]}}, SMP)
            sent += 1
        while time.time() < start + secs:
            self.pump()
            time.sleep(0.05)
        # A moment for the last events to be handled.
        end = time.time() + 1
        while time.time() < end:
            self.pump()
            time.sleep(0.05)
        u1 = self.usage()
        changed, self.weft_changes = self.weft_changes, None
        return {"sent": sent, "rate": round(sent / max(1e-9, time.time() - start), 1),
                "kernel_changes": changed, "usage": scale.span(u0, u1)}


def split_latency(exps, events):
    """Each write's latency in two: until the bench's own watch on the API got its event (the
    API's part: the write, etcd, the apiserver's watch cache and fan-out, one TLS stream) and from
    then until the kernel had it (weftd's part, and its own watch stream's delivery).
    `events`: scale_kube.py apiwatch's lines."""
    by_rv, deleted = {}, {}
    for t, kind, name, rv in events:
        if kind == "DELETED":
            deleted.setdefault(name, t)
        else:
            by_rv.setdefault(rv, t)
    api, weft = [], []
    for e in exps:
        if e.kind == "del":
            t = deleted.get(node_name(e.peer.idx))
        else:
            t = by_rv.get(getattr(e, "rv", None))
        if t is None:
            continue
        api.append(t - e.t_write)
        if e.done is not None:
            weft.append(e.done - t)

    def q(xs):
        if not xs:
            return None
        return {"n": len(xs), "p50_ms": scale.ms(scale.pct(xs, 50)),
                "p99_ms": scale.ms(scale.pct(xs, 99)), "max_ms": scale.ms(max(xs))}

    return {"api": q(api), "weft": q(weft)}


def read_apiwatch(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                if len(p) == 4:
                    out.append((float(p[0]), p[1], p[2], p[3]))
    except OSError:
        pass
    return out


TYPE = re.compile(rb'"type":"([A-Z]+)"')
NAME = re.compile(rb'"name":"([^"]+)"')
RV = re.compile(rb'"resourceVersion":"([0-9]+)"')


def cmd_apiwatch(a):
    """A watch on every Node as the admin, from now on, each event stamped on arrival (its type,
    Node and resourceVersion, read with a pattern: the first name and resourceVersion of an
    event are its metadata's), until SIGTERM."""
    kube = Kube(a, agent=BENCH_AGENT + "-watch")
    rv = json.loads(kube.call("GET", "/api/v1/nodes?limit=1"))["metadata"]["resourceVersion"]
    conn = http.client.HTTPSConnection(kube.host, kube.port, timeout=None, context=kube.ctx)
    conn.request("GET", "/api/v1/nodes?watch=1&timeoutSeconds=3600&resourceVersion=" + rv,
                 headers={"Authorization": "Bearer " + kube.token, "Accept": "application/json",
                          "User-Agent": kube.agent})
    r = conn.getresponse()
    if r.status != 200:
        sys.exit("watch: HTTP %d %s" % (r.status, r.read(300)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open(a.out, "w", buffering=1) as out, open(a.marker, "w") as m:
        m.write("watching\n")
        m.flush()
        while True:
            line = r.readline()
            if not line:
                break
            t = time.time()
            ty, name, rv = TYPE.search(line), NAME.search(line), RV.search(line)
            if ty and name and rv:
                out.write("%.6f %s %s %s\n" % (t, ty.group(1).decode(), name.group(1).decode(),
                                                rv.group(1).decode()))


def audit_requests(path, user, phases):
    """weftd's requests (user `user`, not the bench's own agent), one per audit ID, by phase and
    by "verb resource[/subresource]"; and the list requests of the cold start."""
    reqs = {}
    with open(path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if (ev.get("user") or {}).get("username") != user:
                continue
            if (ev.get("userAgent") or "").startswith(BENCH_AGENT):
                continue
            r = reqs.setdefault(ev["auditID"], {"agent": ev.get("userAgent")})
            ref = ev.get("objectRef") or {}
            what = "%s %s" % (ev.get("verb"), ref.get("resource", ev.get("requestURI")))
            if ref.get("subresource"):
                what += "/" + ref["subresource"]
            if ref.get("name") and ev.get("verb") in ("get", "patch", "update"):
                what += " (own)" if ref["name"] == OWN_NAME else " (%s)" % ref["name"]
            r["what"] = what
            r["uri"] = ev.get("requestURI")
            r["received"] = stamp(ev["requestReceivedTimestamp"])
            code = (ev.get("responseStatus") or {}).get("code")
            if code:
                r["code"] = code
            if ev.get("stage") == "ResponseComplete":
                r["complete"] = stamp(ev["stageTimestamp"])
    out = {name: {} for name in phases}
    out["other"] = {}
    errors = []
    for r in sorted(reqs.values(), key=lambda r: r["received"]):
        where = "other"
        for name, (t0, t1) in phases.items():
            if t0 <= r["received"] < t1:
                where = name
                break
        out[where][r["what"]] = out[where].get(r["what"], 0) + 1
        if r.get("code") and not 200 <= r["code"] < 300:
            errors.append({"what": r["what"], "code": r["code"], "uri": r["uri"]})
    t0, t1 = phases["start"]
    lists = [r for r in reqs.values() if r["what"] == "list nodes" and t0 <= r["received"] < t1]
    agents = sorted({r["agent"] for r in reqs.values() if r.get("agent")})
    return {"by_phase": out, "errors": errors[:20], "agents": agents,
            "start_lists": [{"received": r["received"], "complete": r.get("complete"),
                             "uri": r["uri"]} for r in sorted(lists, key=lambda r: r["received"])]}


def loadavg():
    """The machine's 1-minute load average: other work on the same 2 cores shows in the tails."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def log_time(path, text):
    """The time of weftd's first log line containing `text` (its own UTC stamp)."""
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if text in line:
                    return stamp(line.split()[0]), line.strip()
    except (OSError, ValueError):
        pass
    return None, None


def cmd_drive(a):
    deadline = time.time() + 60
    while not (os.path.getsize(a.start_file) if os.path.exists(a.start_file) else 0):
        if time.time() > deadline:
            sys.exit("no start file %s" % a.start_file)
        time.sleep(0.005)
    with open(a.start_file) as f:
        t0, pid = f.read().split()
    a.t0, a.pid = float(t0), int(pid)
    d = KubeDriver(a)
    res = {"backend": a.backend, "n": a.n, "shape": a.shape, "load": [loadavg()]}
    res["cold"] = d.phase("start", d.cold, a.t0)
    d.phases["start"] = (a.t0 - 1, d.phases["start"][1])
    res["idle"] = d.phase("idle", d.idle, a.idle)
    if a.heartbeat_secs > 0:
        rate = max(1.0, a.n / a.heartbeat_period)
        res["heartbeats"] = d.phase("heartbeats", d.heartbeats, a.heartbeat_secs, rate)
    res["changes"] = d.phase("changes", d.steady_kind, "change", a.changes, a.rate)
    res["deletes"] = d.phase("deletes", d.steady_kind, "del", a.deletes, a.rate)
    res["adds"] = d.phase("adds", d.steady_kind, "add", a.adds, a.rate)
    res["burst"] = d.phase("burst", d.burst_changes, a.burst)
    res["idle_after"] = d.phase("idle_after", d.idle, a.idle)
    if a.apiwatch:
        events = read_apiwatch(a.apiwatch)
        for name, exps in zip(("changes", "deletes", "adds", "burst"), d.measured):
            res[name]["split"] = split_latency(exps, events)
    res["watch_lines"] = d.kernel.lines
    res["overruns"] = d.kernel.overruns
    res["final_usage"] = d.usage()
    res["load"].append(loadavg())

    # When the node list arrived: the apiserver's audit (its last page complete) and weftd's log.
    time.sleep(1)  # the audit backend writes each event as it happens; a moment for the last
    res["requests"] = audit_requests(a.audit, a.user, d.phases)
    lists = res["requests"]["start_lists"]
    cold = res["cold"]
    done_at = (a.t0 + cold["all_ms"] / 1000) if cold.get("all_ms") is not None else None
    if lists:
        first, last = lists[0]["received"], lists[-1].get("complete")
        cold["list_pages"] = len(lists)
        cold["list_begin_ms"] = scale.ms(first - a.t0)
        if last:
            cold["list_done_ms"] = scale.ms(last - a.t0)
            cold["list_ms"] = scale.ms(last - first)
            if done_at:
                cold["after_list_ms"] = scale.ms(done_at - last)
    t_loaded, line = log_time(a.weftd_log, "lease listing loaded")
    if t_loaded:
        cold["loaded_ms"] = scale.ms(t_loaded - a.t0)
        cold["loaded_line"] = line
        if done_at:
            cold["after_loaded_ms"] = scale.ms(done_at - t_loaded)
    res["peer_events"] = {"changes": res["changes"]["ops"], "deletes": res["deletes"]["ops"],
                          "adds": res["adds"]["ops"], "burst": res["burst"]["ops"],
                          "heartbeats": (res.get("heartbeats") or {}).get("sent", 0)}
    for k in ("prefill", "list"):
        p = getattr(a, k + "_file")
        if p and os.path.exists(p):
            with open(p) as f:
                res[k] = json.load(f)
    with open(a.out, "w") as f:
        f.write(json.dumps(res) + "\n")


# ---------------------------------------------------------------------------------------------
# report


def cmd_report(a):
    rows = [json.loads(line) for line in open(a.results) if line.strip()]

    def f(v, unit=""):
        # A split's part can round to -0 (weftd's stream delivered before the bench's): 0.
        return "–" if v is None else ("%g%s" % (v or 0, unit))

    def mib(kib):
        return "–" if kib is None else "%.1f" % (kib / 1024)

    def lat(r):
        if not r or not r.get("n"):
            return "–"
        s = "%s / %s / %s" % (f(r["p50_ms"]), f(r["p99_ms"]), f(r["max_ms"]))
        return s if r["ok"] else s + " (%d missing)" % r["missing"]

    def head(r):
        return "%s | %s | %d | %s" % (r["label"], r["backend"], r["n"], r["shape"])

    print("### The node list and the cold start (ms)")
    print()
    print("The list as weftd reads it (pages of %d), timed by the bench as weft's identity before "
          "weftd starts (fastest / median of its runs). weftd's own listing from the apiserver's audit "
          "log: its first page received and its last page complete, from weftd's start. "
          "\"listing loaded\": weftd's log line, once every page is parsed into the peer set. "
          "All in place: every peer's route (vxlan: and neighbour, FDB entry) seen in the kernel, "
          "from weftd's start and after the last page went out." % WEFTD_PAGE)
    print()
    print("| weftd | backend | nodes | node objects | node list: KiB (per node) | "
          "list timed by the bench | weftd's list: begin → done | listing loaded | READY=1 | "
          "all in place | after the last page | after listing loaded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, lst = r["cold"], r.get("list") or {}
        print("| %s | %s (%s) | %s / %s | %s → %s (%s pages) | %s | %s | %s | %s | %s |" % (
            head(r),
            "%d" % (lst["bytes"] / 1024) if lst else "–", f(lst.get("bytes_per_node"), " B"),
            f(lst.get("ms_min")), f(lst.get("ms_median")),
            f(c.get("list_begin_ms")), f(c.get("list_done_ms")), f(c.get("list_pages")),
            f(c.get("loaded_ms")), f(c.get("ready_ms")),
            f(c["all_ms"]) if c["ok"] else "not all in %ds" % 180,
            f(c.get("after_list_ms")), f(c.get("after_loaded_ms"))))
    print()
    print("### Changes to the kernel (ms)")
    print()
    print("Latency from each Node write (as the admin, the moment before it is sent) to the "
          "kernel state: p50 / p99 / max. A change is a peer's new VtepMAC (vxlan) or public-ip, "
          "patched on its Node's status as flanneld does; deletes and adds are whole Nodes. Burst: "
          "that many changes from 8 connections at once; the last in place after the last write, "
          "and p99.")
    print()
    print("| weftd | backend | nodes | node objects | changes at | change | delete | add | "
          "burst of changes: last / p99 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r.get("burst") or {}
        print("| %s | %s/s (%d) | %s | %s | %s | %d: %s / %s |" % (
            head(r), f(round(r["changes"]["rate"], 1)), r["changes"]["ops"], lat(r["changes"]),
            lat(r["deletes"]), lat(r["adds"]), b.get("ops", 0),
            f(b.get("after_last_ms")) if b.get("ok") else "%d missing" % b.get("missing", 0),
            f(b.get("p99_ms"))))
    print()
    print("Where the time goes: each write's latency split at the moment the bench's own watch "
          "on the API (a second client, as the admin, in the same host) got its event. The API's "
          "part: the write, etcd, the apiserver's watch cache and its fan-out; weftd's part: from "
          "there to the kernel (its own watch stream's delivery included). p50 / p99 / max.")
    print()
    print("| weftd | backend | nodes | node objects | change: API / weftd | delete: API / weftd | "
          "add: API / weftd | burst: API / weftd |")
    print("|---|---|---|---|---|---|---|---|")

    def part(r, k):
        q = ((r.get(k) or {}).get("split") or {})

        def one(x):
            return "–" if not x else "%s / %s / %s" % (f(x["p50_ms"]), f(x["p99_ms"]),
                                                      f(x["max_ms"]))
        return "%s ‖ %s" % (one(q.get("api")), one(q.get("weft")))

    for r in rows:
        print("| %s | %s | %s | %s | %s |" % (head(r), part(r, "changes"), part(r, "deletes"),
                                              part(r, "adds"), part(r, "burst")))
    print()
    print("### Memory and CPU")
    print()
    print("RSS at the end of each phase; peak RSS (VmHWM) at the end of the run; CPU as a share "
          "of one core over the phase. Heartbeats: kubelet-style status updates of random peer "
          "Nodes (every node once per 5 minutes, as kubelets do when nothing changes), and the "
          "changes to weft's kernel objects seen meanwhile (routes and neighbours in the network, "
          "FDB entries: should be 0).")
    print()
    print("| weftd | backend | nodes | node objects | RSS idle (MiB) | RSS after churn (MiB) | "
          "peak RSS after the cold start (MiB) | peak RSS at the end (MiB) | threads | CPU idle | "
          "heartbeats: rate, CPU, kernel changes | CPU changes | log lines | full passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        idle, after = r.get("idle") or {}, r.get("idle_after") or {}
        hb = r.get("heartbeats") or {}
        hbu = hb.get("usage") or {}
        ch = (r.get("changes") or {}).get("usage") or {}
        fin = r.get("final_usage") or {}
        print("| %s | %s | %s | %s | %s | %s | %s%% | %s | %s%% | %d | %s |" % (
            head(r), mib(idle.get("rss_kib")), mib(after.get("rss_kib")),
            mib(idle.get("hwm_kib")), mib(fin.get("hwm_kib")), f(idle.get("threads")),
            f(idle.get("cpu_pct")),
            "%s/s, %s%%, %s" % (f(hb.get("rate")), f(hbu.get("cpu_pct")),
                                f(hb.get("kernel_changes"))) if hb else "–",
            f(ch.get("cpu_pct")), r["log_lines"], f(r.get("full_passes"))))
    print()
    print("### weftd's API requests, from the apiserver's audit log")
    print()
    print("Every request made with weft's token (the bench's own timed list left out), by phase; "
          "\"peer events\" is what the other Nodes did meanwhile.")
    print()
    print("| weftd | backend | nodes | node objects | phase | peer events | requests |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ev = r.get("peer_events") or {}
        evs = {"cold start": "%d nodes listed" % r["n"], "idle": "–",
               "heartbeats": "%d status updates" % ev.get("heartbeats", 0),
               "changes": "%d changes" % ev.get("changes", 0),
               "deletes": "%d deletes" % ev.get("deletes", 0),
               "adds": "%d adds" % ev.get("adds", 0),
               "burst": "%d changes" % ev.get("burst", 0), "idle after": "–",
               "between phases": "–"}
        for ph, counts in r["requests"]["by_phase"].items():
            if not counts and ph == "other":
                continue
            text = ", ".join("%s ×%d" % (k, v) for k, v in sorted(counts.items())) or "none"
            ph = {"start": "cold start", "other": "between phases"}.get(ph, ph.replace("_", " "))
            print("| %s | %s | %s | %s |" % (head(r), ph, evs.get(ph, "–"), text))
    print()
    print("### Prefill (not part of the result)")
    print()
    print("| backend | nodes | node objects | bytes sent per node | connections | time (s) | "
          "nodes/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r.get("prefill") or {}
        print("| %s | %d | %s | %s | %s | %s | %s |" % (
            r["backend"], r["n"], r["shape"], f(p.get("bytes_sent_per_node")), f(p.get("conns")),
            f(p.get("secs")), f(p.get("per_sec"))))
    print()
    print("Load average (1 min) at the driver's start and end, per case: %s." % ", ".join(
        "%s %d %s: %s" % (r["backend"], r["n"], r["shape"],
                          " → ".join("%g" % x for x in r.get("load", [])))
        for r in rows))
    for r in rows:
        notes = []
        if r.get("overruns"):
            notes.append("%d watcher overruns" % r["overruns"])
        if r.get("log_warnings"):
            notes.append("%d warning lines in weftd's log" % r["log_warnings"])
        if r["requests"].get("errors"):
            notes.append("weftd's requests answered with errors: %s" % ", ".join(
                "%s %s" % (e["what"], e["code"]) for e in r["requests"]["errors"]))
        if notes:
            print()
            print("Note: %s %s %d %s: %s." % (r["label"], r["backend"], r["n"], r["shape"],
                                             "; ".join(notes)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("prefill", "list", "drive", "apiwatch"):
        p = sub.add_parser(name)
        p.add_argument("--api", required=True, help="https://host:port")
        p.add_argument("--ca", required=True)
        p.add_argument("--token-file", required=True)
        p.add_argument("--out", required=True)
    for name in ("prefill", "drive"):
        p = sub.choices[name]
        p.add_argument("--backend", required=True, choices=["vxlan", "host-gw", "udp"])
        p.add_argument("--n", type=int, required=True)
        p.add_argument("--shape", choices=["kubelet", "minimal"], default="kubelet")
    p = sub.choices["prefill"]
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--own-ip", required=True, help="this host's address, for its Node's status")
    sub.choices["list"].add_argument("--repeat", type=int, default=3)
    sub.choices["apiwatch"].add_argument("--marker", required=True)
    d = sub.choices["drive"]
    d.add_argument("--events", required=True)
    d.add_argument("--start-file", required=True)
    d.add_argument("--audit", required=True)
    d.add_argument("--user", required=True, help="weft's identity in the apiserver")
    d.add_argument("--weftd-log", required=True)
    d.add_argument("--prefill-file")
    d.add_argument("--list-file")
    d.add_argument("--apiwatch", help="scale_kube.py apiwatch's output")
    d.add_argument("--idle", type=float, default=35)
    d.add_argument("--rate", type=float, default=20)
    d.add_argument("--changes", type=int, default=200)
    d.add_argument("--deletes", type=int, default=100)
    d.add_argument("--adds", type=int, default=100)
    d.add_argument("--burst", type=int, default=500)
    d.add_argument("--heartbeat-secs", type=float, default=30)
    d.add_argument("--heartbeat-period", type=float, default=300)
    d.add_argument("--cold-limit", type=float, default=180)
    r = sub.add_parser("report")
    r.add_argument("results")
    a = ap.parse_args()
    sys.setswitchinterval(0.0005)
    if a.cmd == "drive":
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    {"prefill": cmd_prefill, "list": cmd_list, "drive": cmd_drive, "apiwatch": cmd_apiwatch,
     "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
