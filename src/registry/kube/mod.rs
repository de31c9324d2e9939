//! The Kubernetes API as the lease store (`--kube-subnet-mgr`), as flanneld's kube subnet
//! manager uses it: this host's lease is its Node's `spec.podCIDR` (assigned by the controller
//! manager: never allocated, renewed or released by weft), published with flannel's annotations
//! on the Node (`<prefix>/backend-type`, `backend-data`, `public-ip`, `kube-subnet-manager`);
//! peers are the other Nodes that carry them. The network config comes from a file
//! (`--net-config-path`, kube-flannel's net-conf.json), not from the API.
//!
//! Requests are made raw and parsed into weft's own cut-down Node (`node.rs`), so a Node's other
//! fields (images, managed fields) are never held, and no request is made per peer event: the
//! only writes are patches of this host's own Node status. Files: `node.rs` (Node → lease
//! record, the patches; pure), `claim.rs` (this host's lease), `watch.rs` (the Node watch).

mod claim;
pub mod inspect;
mod list;
pub mod node;
mod watch;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http::Request;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::Value;
use tracing::debug;

use super::Names;
use crate::escape::Escaped;
use crate::flags::KubeArgs;
use crate::lease::Record;
pub use node::{Annotations, Node, DEFAULT_PREFIX};
pub use watch::KubeWatch;

/// How weft's requests name themselves to the API server.
const USER_AGENT: &str = concat!("weft/", env!("CARGO_PKG_VERSION"));
/// Longest wait for one API request (a watch's wait for events is bounded separately).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Nodes per page of a listing. A page is held whole while it is parsed, so it bounds the
/// listing's peak memory: 100 kubelet-registered Nodes (~10 KB each, with their images) are
/// ~1 MB; 500, client-go's page, cost weftd ~15 MiB of peak RSS at 5,000 Nodes (BENCHMARKS.md).
const PAGE: usize = 100;
/// The largest answer read: a page of 100 Nodes of ~20 KB each is 2 MB; a Node can be 1.5 MB.
const MAX_ANSWER: usize = 64 << 20;

/// The Kubernetes API, for this host's Node.
#[derive(Clone)]
pub struct KubeStore {
    client: kube::Client,
    node: String,
    names: Names,
    annotations: Annotations,
    set_network_unavailable: bool,
    /// Every Node is listed and watched; `false` (alloc): this host's only.
    peers: bool,
}

impl KubeStore {
    /// Connects as `args` say (a kubeconfig, else the pod's service account), and finds this
    /// host's Node name (`NODE_NAME`, else the pod's `spec.nodeName` from `POD_NAME` and
    /// `POD_NAMESPACE`).
    pub async fn connect(args: &KubeArgs, net_config: Option<PathBuf>) -> Result<Self> {
        let config = client_config(args).await?;
        let client = kube::Client::try_from(config).context("set up the Kubernetes client")?;
        let annotations = Annotations::new(&args.kube_annotation_prefix);
        let mut store = Self {
            client,
            node: String::new(),
            names: Names::kube(&annotations, net_config),
            annotations,
            set_network_unavailable: args.set_node_network_unavailable,
            peers: true,
        };
        store.node = store.node_name().await?;
        Ok(store)
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn follow_peers(&mut self, peers: bool) {
        self.peers = peers;
    }

    /// The query that picks the Nodes followed: all, or this host's only.
    fn selector(&self) -> String {
        if self.peers {
            String::new()
        } else {
            format!(
                "&fieldSelector={}",
                query(&format!("metadata.name={}", self.node))
            )
        }
    }

    /// This host's Node.
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn node_name(&self) -> Result<String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let Some(name) = env("NODE_NAME") {
            return dns_name(&name).map(str::to_string).context("NODE_NAME");
        }
        let (Some(pod_name), Some(ns)) = (env("POD_NAME"), env("POD_NAMESPACE")) else {
            bail!("-kube-subnet-mgr needs this host's Node: set NODE_NAME (or POD_NAME and POD_NAMESPACE)");
        };
        #[derive(Deserialize)]
        struct Pod {
            spec: PodSpec,
        }
        #[derive(Deserialize)]
        struct PodSpec {
            #[serde(rename = "nodeName", default)]
            node_name: String,
        }
        let path = format!(
            "/api/v1/namespaces/{}/pods/{}",
            dns_name(&ns)?,
            dns_name(&pod_name)?
        );
        let text = self.get(&path).await?;
        let pod: Pod = serde_json::from_str(&text).context("read the pod")?;
        if pod.spec.node_name.is_empty() {
            bail!(
                "pod {}/{} is not scheduled to a node",
                Escaped(&ns),
                Escaped(&pod_name)
            );
        }
        dns_name(&pod.spec.node_name)
            .map(str::to_string)
            .context("the pod's spec.nodeName")
    }

    /// The PublicIP and PublicIPv6 an operator gave this Node (`<prefix>/node-public-ip`,
    /// `<prefix>/node-public-ipv6`), which flanneld takes as -public-ip and -public-ipv6; one
    /// that is not an address of its family is said once and ignored.
    pub async fn node_public_ips(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let node = crate::retry::retry("read this host's node", || self.get_node()).await;
        let warn = |e: String| {
            tracing::warn!("{}; using the interface's address", Escaped(&e));
        };
        let v4 =
            node::annotation_ip(&node, &self.annotations, "node-public-ip").unwrap_or_else(|e| {
                warn(e);
                None
            });
        let v6 =
            node::annotation_ip(&node, &self.annotations, "node-public-ipv6").unwrap_or_else(|e| {
                warn(e);
                None
            });
        (v4, v6)
    }

    /// This host's Node as it is now.
    pub async fn get_node(&self) -> Result<Node> {
        let text = self.get(&format!("/api/v1/nodes/{}", self.node)).await?;
        serde_json::from_str(&text).with_context(|| format!("read node {}", Escaped(&self.node)))
    }

    /// A strategic-merge patch of this host's Node status (where flanneld writes too: its
    /// annotations and conditions; RBAC: `nodes/status` patch).
    pub async fn patch_status(&self, patch: &Value) -> Result<()> {
        let path = format!("/api/v1/nodes/{}/status", self.node);
        let req = Request::patch(path)
            .header("Content-Type", "application/strategic-merge-patch+json")
            .body(patch.to_string().into_bytes())?;
        self.text(req).await.map(drop)
    }

    async fn get(&self, path: &str) -> Result<String> {
        self.text(Request::get(path).body(Vec::new())?).await
    }

    /// One request, bounded in time; the API's refusal (RBAC, a missing node) as its message.
    async fn text(&self, req: Request<Vec<u8>>) -> Result<String> {
        let body = self.bytes(req).await?;
        String::from_utf8(body).context("the API's answer is not UTF-8")
    }

    /// One request's answer, bounded in time and in size.
    async fn bytes(&self, req: Request<Vec<u8>>) -> Result<Vec<u8>> {
        let what = format!("{} {}", req.method(), req.uri());
        let call = async {
            let res = self.client.send(req.map(kube::client::Body::from)).await?;
            let status = res.status();
            let body = read_body(res.into_body()).await?;
            if status.is_success() {
                return Ok(body);
            }
            Err(match serde_json::from_slice::<kube::core::Status>(&body) {
                Ok(s) => api_error(kube::Error::Api(Box::new(s))),
                Err(_) => anyhow!("{status}: {}", Escaped(&String::from_utf8_lossy(&body))),
            })
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(r) => r.with_context(|| what),
            Err(_) => Err(anyhow!("no answer in {}s", REQUEST_TIMEOUT.as_secs())).context(what),
        }
    }

    /// In Kubernetes the network config is a file (`--net-config-path`), never the API's.
    pub async fn get_config(&self) -> Result<(Option<String>, super::Position)> {
        bail!(
            "with -kube-subnet-mgr the network config is read from {}",
            self.names.config()
        )
    }

    pub async fn put_config(&self, _text: &str) -> Result<()> {
        bail!(
            "with -kube-subnet-mgr the network config is the file {}",
            self.names.config()
        )
    }

    pub async fn put_config_if_absent(&self, text: &str) -> Result<Option<String>> {
        self.put_config(text).await.map(|()| None)
    }

    /// Nothing in the API is waited on (the config is a file, subnets are assigned): a pause.
    pub async fn wait_for(&self, _after: super::Position, _what: super::Awaited) {
        crate::notify::pause(Duration::from_secs(5)).await;
    }

    /// A podCIDR needs no renewal.
    pub async fn renew(&self, _lease: &crate::lease::Lease) -> Result<super::Renewal> {
        Ok(super::Renewal::Renewed)
    }

    /// A podCIDR is the cluster's to take back; the annotations stay, as flanneld leaves them.
    pub async fn release(&self, _lease: &crate::lease::Lease) {}

    pub async fn time_left(&self, _lease: &crate::lease::Lease) -> Result<Option<i64>> {
        Ok(None)
    }

    /// Marks the Node's network available, once per start, if asked to.
    pub async fn data_plane_up(&self) -> Result<()> {
        if !self.set_network_unavailable {
            return Ok(());
        }
        let now = jiff::Timestamp::now()
            .round(jiff::Unit::Second)?
            .to_string();
        self.patch_status(&node::network_available_patch(&now))
            .await
            .context("mark the node's network available (NetworkUnavailable=False)")
    }

    /// Every Node that carries a lease, page by page from one snapshot; the resourceVersion the
    /// listing was read at.
    pub async fn list_records_paged(&self, mut each: impl FnMut(Record)) -> Result<i64> {
        let selector = self.selector();
        self.each_node(&selector, &mut |json| {
            if let Some(r) = self.record(json) {
                each(r);
            }
        })
        .await
    }

    /// Every Node `selector` picks ("": all), page by page from one snapshot, each handed over
    /// as its JSON; the resourceVersion the listing was read at. Each page is read as it is
    /// parsed: held once, its Nodes never all at once.
    pub(super) async fn each_node(
        &self,
        selector: &str,
        each: &mut dyn FnMut(&str),
    ) -> Result<i64> {
        let mut next: Option<String> = None;
        let mut at = None;
        loop {
            let mut path = format!("/api/v1/nodes?limit={PAGE}{selector}");
            if let Some(c) = &next {
                path.push_str("&continue=");
                path.push_str(&query(c));
            }
            let page = self.bytes(Request::get(path).body(Vec::new())?).await?;
            let mut de = serde_json::Deserializer::from_slice(&page);
            let meta = list::Page { each: &mut *each }
                .read(&mut de)
                .context("read the node list")?;
            at.get_or_insert(meta.resource_version);
            next = meta.next.filter(|c| !c.is_empty());
            if next.is_none() {
                break;
            }
        }
        position(at.as_deref().unwrap_or_default())
    }

    /// The lease record a Node's JSON holds, if it holds one. A Node that cannot be parsed is
    /// logged (escaped) and skipped: the API validated it, so this is not expected.
    fn record(&self, json: &str) -> Option<Record> {
        match serde_json::from_str::<Node>(json) {
            Ok(n) => match node::seen(&n, &self.annotations) {
                node::Seen::Lease(r) => Some(r),
                node::Seen::NotLease(why) => {
                    debug!(node = %Escaped(&n.metadata.name), "not a peer: {why}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!("a node the API sent cannot be read: {e}; skipped");
                None
            }
        }
    }
}

/// A body in one buffer, each chunk dropped as soon as it is copied: the answer is held once,
/// not as hyper's chunks and their concatenation both (a page's size twice at the peak).
async fn read_body(mut body: kube::client::Body) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| anyhow!("reading the answer: {e}"))?;
        if let Ok(chunk) = frame.into_data() {
            if all.len() + chunk.len() > MAX_ANSWER {
                bail!("the answer is larger than {} MiB", MAX_ANSWER >> 20);
            }
            all.extend_from_slice(&chunk);
        }
    }
    Ok(all)
}

/// The position of a resourceVersion. Opaque to clients by the API's contract, it is an etcd
/// revision in every API server there is; weft only hands it back, and needs it as a number to
/// fit the registry's positions.
fn position(rv: &str) -> Result<i64> {
    rv.parse().map_err(|_| {
        anyhow!(
            "the API server's resourceVersion \"{}\" is not a number: weft needs an etcd-backed API server",
            Escaped(rv)
        )
    })
}

/// The client configuration flanneld would use: `--kubeconfig-file` if given, else the pod's
/// service account (its token file re-read as it is renewed); `--kube-api-url` overrides the
/// server either way.
async fn client_config(args: &KubeArgs) -> Result<kube::Config> {
    let url = args
        .kube_api_url
        .as_deref()
        .map(|u| {
            u.parse::<http::Uri>()
                .with_context(|| format!("-kube-api-url {u:?}"))
        })
        .transpose()?;
    let mut config = if let Some(path) = &args.kubeconfig_file {
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("read the kubeconfig {}", path.display()))?;
        kube::Config::from_custom_kubeconfig(file, &Default::default())
            .await
            .with_context(|| format!("use the kubeconfig {}", path.display()))?
    } else {
        match (kube::Config::incluster(), &url) {
            (Ok(c), _) => c,
            // Outside a pod, a URL alone (an API server that needs no credentials).
            (Err(_), Some(u)) => kube::Config::new(u.clone()),
            (Err(e), None) => {
                return Err(e).context(
                    "not in a pod (no service account) and neither -kubeconfig-file nor -kube-api-url given",
                )
            }
        }
    };
    if let Some(u) = url {
        config.cluster_url = u;
    }
    config.connect_timeout = Some(Duration::from_secs(10));
    // The apiserver's audit log and metrics name clients by it, as flanneld's client-go does.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    // Watches wait for events longer than requests: bounded by the server (timeoutSeconds) and
    // by this.
    config.read_timeout = Some(watch::WATCH_SECS + Duration::from_secs(30));
    Ok(config)
}

/// The API's refusal as one line: its message says what was refused (RBAC names the verb and
/// the resource).
fn api_error(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow!("{} ({} {})", Escaped(&s.message), s.code, s.reason),
        e => anyhow::Error::new(e),
    }
}

/// Whether a failure is the API saying the history asked for is gone (410).
fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// A Node, pod or namespace name as the API allows it (a DNS subdomain), so that it is a path
/// segment as it stands.
fn dns_name(s: &str) -> Result<&str> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        bail!("\"{}\" is not a Kubernetes object name", Escaped(s));
    }
    Ok(s)
}

/// A query value, percent-encoded.
fn query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_name_weft_as_their_user_agent_and_are_bounded_in_time() {
        let args = KubeArgs {
            kube_subnet_mgr: true,
            kube_api_url: Some("https://192.0.2.1:6443".into()),
            kubeconfig_file: None,
            kube_annotation_prefix: DEFAULT_PREFIX.into(),
            set_node_network_unavailable: true,
        };
        let c = client_config(&args)
            .await
            .expect("a config from the URL alone");
        assert_eq!(c.cluster_url.to_string(), "https://192.0.2.1:6443/");
        let agent = c
            .headers
            .iter()
            .find(|(k, _)| k == http::header::USER_AGENT);
        let agent = agent
            .and_then(|(_, v)| v.to_str().ok())
            .expect("a User-Agent");
        assert!(agent.starts_with("weft/"), "{agent}");
        assert!(c.connect_timeout.is_some() && c.read_timeout.is_some());
    }
}
