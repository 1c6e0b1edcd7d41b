//! `cluster.toml`: the one file an operator writes to describe a cluster.
//!
//! Owns parsing and validation. A file that parses is internally consistent:
//! node ids and addresses are unique, every role and token role is known,
//! there is at least one `meta` node, and every relative path has been
//! resolved against the directory of the file (so a config works the same
//! whatever the working directory of the process). Errors name the line.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A node's roles (ARCHITECTURE.md: meta = Raft voter, data = holds shard
/// replicas, proxy = serves clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Meta,
    Data,
    Proxy,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "meta" => Ok(Role::Meta),
            "data" => Ok(Role::Data),
            "proxy" => Ok(Role::Proxy),
            other => Err(format!("unknown role {other:?}: use meta, data, proxy")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Meta => "meta",
            Role::Data => "data",
            Role::Proxy => "proxy",
        })
    }
}

/// What an API token may do. Ordered: each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// search, get, list, describe, status
    Read,
    /// + upsert, delete
    Write,
    /// + create and drop collections, cluster administration
    Admin,
}

impl fmt::Display for TokenRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TokenRole::Read => "read",
            TokenRole::Write => "write",
            TokenRole::Admin => "admin",
        })
    }
}

/// Failure-detector settings (cluster.toml `[cluster]`).
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    pub heartbeat: Duration,
    pub suspect_after: Duration,
    pub dead_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Missing { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: RawCluster,
    #[serde(default)]
    tokens: Vec<Spanned<RawToken>>,
    #[serde(default)]
    nodes: Vec<Spanned<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default = "default_certs_dir")]
    certs_dir: PathBuf,
    /// Node → leader heartbeat period.
    #[serde(default = "default_heartbeat_ms")]
    heartbeat_ms: Spanned<u64>,
    /// Silence after which the leader marks a node suspect.
    #[serde(default = "default_suspect_ms")]
    suspect_ms: Spanned<u64>,
    /// Silence after which the leader marks a node dead.
    #[serde(default = "default_dead_after_ms")]
    dead_after_ms: Spanned<u64>,
    /// Raft leader → follower heartbeat period.
    #[serde(default = "default_raft_heartbeat_ms")]
    raft_heartbeat_ms: Spanned<u64>,
    /// Raft election timeout range `[min, max]` in ms (randomised per term).
    #[serde(default = "default_election_timeout_ms")]
    election_timeout_ms: Spanned<(u64, u64)>,
    /// Metadata log entries between snapshots; older entries are purged
    /// (a node that falls further behind receives the snapshot).
    #[serde(default = "default_raft_snapshot_logs")]
    raft_snapshot_logs: Spanned<u64>,
    /// Bytes of applied ops each shard replica keeps in its op log for the
    /// catch-up of lagging replicas (KiB); further behind, a replica is
    /// rebuilt from an export of the shard.
    #[serde(default = "default_oplog_retain_kb")]
    oplog_retain_kb: Spanned<u64>,
    /// Share of a shard's vector bytes its op log keeps, in percent,
    /// within `oplog_retain_kb` and not below 1 MiB (a replica further
    /// behind catches up about as fast from an export); 0: the log keeps
    /// `oplog_retain_kb` whatever the shard's size.
    #[serde(default = "default_oplog_retain_percent")]
    oplog_retain_percent: Spanned<u32>,
    /// Bytes (KiB) a primary's op log may grow to while it holds ops for
    /// a replica that left the in-sync set, so that the replica catches up
    /// from the log when it returns instead of from an export of the
    /// whole shard; 0 holds nothing beyond `oplog_retain_kb`.
    #[serde(default = "default_oplog_hold_kb")]
    oplog_hold_kb: Spanned<u64>,
    /// Bytes of request bodies a node holds at once (MiB); at least the
    /// frame limit, so that the largest request can be read.
    #[serde(default = "default_request_budget_mb")]
    request_budget_mb: Spanned<u64>,
    /// Testing only: enables `PUT /fault/partition` on the admin HTTP
    /// endpoint, which cuts this node off from the nodes it names.
    #[serde(default)]
    fault_injection: bool,
}

fn default_raft_snapshot_logs() -> Spanned<u64> {
    Spanned::new(0..0, 2_000)
}

fn default_request_budget_mb() -> Spanned<u64> {
    Spanned::new(0..0, (crate::net::server::MAX_INFLIGHT_REQUEST_BYTES >> 20) as u64)
}

fn default_oplog_retain_kb() -> Spanned<u64> {
    Spanned::new(0..0, edgevec_engine::OPLOG_RETAIN_BYTES / 1024)
}

fn default_oplog_retain_percent() -> Spanned<u32> {
    Spanned::new(0..0, edgevec_engine::OPLOG_RETAIN_PERCENT)
}

fn default_oplog_hold_kb() -> Spanned<u64> {
    Spanned::new(0..0, edgevec_engine::OPLOG_HOLD_BYTES / 1024)
}

fn default_heartbeat_ms() -> Spanned<u64> {
    Spanned::new(0..0, 200)
}
fn default_suspect_ms() -> Spanned<u64> {
    Spanned::new(0..0, 1_000)
}
fn default_dead_after_ms() -> Spanned<u64> {
    Spanned::new(0..0, 60_000)
}
fn default_raft_heartbeat_ms() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}
fn default_election_timeout_ms() -> Spanned<(u64, u64)> {
    Spanned::new(0..0, (250, 500))
}

fn default_certs_dir() -> PathBuf {
    PathBuf::from("certs")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    token: Spanned<String>,
    role: TokenRole,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<u64>,
    addr: Spanned<SocketAddr>,
    data_dir: PathBuf,
    #[serde(default)]
    admin_addr: Option<Spanned<SocketAddr>>,
    #[serde(default = "default_zone")]
    zone: String,
    #[serde(default = "default_roles")]
    roles: Spanned<Vec<Role>>,
}

fn default_zone() -> String {
    "default".into()
}

fn default_roles() -> Spanned<Vec<Role>> {
    Spanned::new(0..0, vec![Role::Meta, Role::Data, Role::Proxy])
}

/// An API token from the file.
#[derive(Debug, Clone)]
pub struct Token {
    pub token: String,
    pub role: TokenRole,
    pub name: String,
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub addr: SocketAddr,
    /// Admin HTTP (`/healthz`, `/readyz`, `/metrics`), if configured.
    pub admin_addr: Option<SocketAddr>,
    /// Absolute (resolved against the config file's directory).
    pub data_dir: PathBuf,
    pub zone: String,
    pub roles: Vec<Role>,
}

impl NodeConfig {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The roles as named in cluster.toml and on the wire.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.iter().map(|r| r.to_string()).collect()
    }
}

/// A validated cluster.toml.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The file it came from.
    pub path: PathBuf,
    pub name: String,
    /// Absolute path of the certificate directory.
    pub certs_dir: PathBuf,
    pub tokens: Vec<Token>,
    pub nodes: Vec<NodeConfig>,
    /// Failure detector settings.
    pub health: HealthSettings,
    pub raft_heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    pub raft_snapshot_logs: u64,
    /// Bytes of applied ops a shard replica's op log keeps.
    pub oplog_retain_bytes: u64,
    /// Share of a shard's vector bytes (percent) its op log keeps within
    /// `oplog_retain_bytes`; `None`: no share.
    pub oplog_retain_percent: Option<u32>,
    /// Bytes a primary's op log may grow to for replicas away from the
    /// in-sync set.
    pub oplog_hold_bytes: u64,
    /// Bytes of request bodies a node holds at once.
    pub request_budget_bytes: usize,
    /// Whether the admin endpoint takes fault-injection requests (tests).
    pub fault_injection: bool,
    /// Things that are legal but probably not meant (printed at start-up).
    pub warnings: Vec<String>,
}

impl ClusterConfig {
    /// Reads and validates a cluster.toml.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, path, &base)
    }

    /// Validates config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: match e.span() {
                Some(span) => format!("line {}: {}", line_of(text, span.start), e.message()),
                None => e.message().to_string(),
            },
        })?;
        let invalid = |offset: usize, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of(text, offset),
            message,
        };

        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        let mut nodes = Vec::new();
        for node in &raw.nodes {
            let n = node.get_ref();
            if !ids.insert(*n.id.get_ref()) {
                return Err(invalid(
                    n.id.span().start,
                    format!("node id {} appears twice", n.id.get_ref()),
                ));
            }
            if *n.id.get_ref() == 0 {
                return Err(invalid(
                    n.id.span().start,
                    "node id 0 is reserved; ids start at 1".into(),
                ));
            }
            if let Some(admin) = &n.admin_addr {
                if !addrs.insert(*admin.get_ref()) {
                    return Err(invalid(
                        admin.span().start,
                        format!("address {} is used twice", admin.get_ref()),
                    ));
                }
            }
            if !addrs.insert(*n.addr.get_ref()) {
                return Err(invalid(
                    n.addr.span().start,
                    format!("address {} is used by two nodes", n.addr.get_ref()),
                ));
            }
            if n.roles.get_ref().is_empty() {
                return Err(invalid(
                    n.roles.span().start,
                    format!(
                        "node {} has no roles; give it some of meta, data, proxy",
                        n.id.get_ref()
                    ),
                ));
            }
            let mut roles = n.roles.get_ref().clone();
            roles.sort_by_key(|r| *r as u8);
            roles.dedup();
            nodes.push(NodeConfig {
                id: *n.id.get_ref(),
                addr: *n.addr.get_ref(),
                admin_addr: n.admin_addr.as_ref().map(|a| *a.get_ref()),
                data_dir: base.join(&n.data_dir),
                zone: n.zone.clone(),
                roles,
            });
        }
        if nodes.is_empty() {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                message: "no [[nodes]]: a cluster needs at least one node".into(),
            });
        }
        let voters = nodes.iter().filter(|n| n.has_role(Role::Meta)).count();
        if voters == 0 {
            return Err(ConfigError::Missing {
                path: path.to_path_buf(),
                message: "no node has the role \"meta\": at least one metadata voter is needed (3 or 5 recommended)"
                    .into(),
            });
        }
        let mut warnings = Vec::new();
        if voters % 2 == 0 {
            warnings.push(format!(
                "{voters} meta nodes: an even number of voters tolerates no more failures than {} would; use an odd number",
                voters - 1
            ));
        }

        let mut seen = HashSet::new();
        let mut tokens = Vec::new();
        for (i, t) in raw.tokens.iter().enumerate() {
            let t = t.get_ref();
            let value = t.token.get_ref();
            if value.len() < 8 {
                return Err(invalid(
                    t.token.span().start,
                    "tokens must be at least 8 characters".into(),
                ));
            }
            if value.len() > edgevec_proto::limits::MAX_TOKEN_BYTES {
                return Err(invalid(
                    t.token.span().start,
                    format!(
                        "tokens must be at most {} bytes",
                        edgevec_proto::limits::MAX_TOKEN_BYTES
                    ),
                ));
            }
            if !seen.insert(value.clone()) {
                return Err(invalid(t.token.span().start, "this token appears twice".into()));
            }
            tokens.push(Token {
                token: value.clone(),
                role: t.role,
                name: t.name.clone().unwrap_or_else(|| format!("token-{}", i + 1)),
            });
        }
        if tokens.is_empty() {
            warnings.push("no [[tokens]]: no client will be able to connect".into());
        }

        let c = &raw.cluster;
        let positive = |v: &Spanned<u64>, what: &str| {
            if *v.get_ref() == 0 {
                Err(invalid(v.span().start, format!("{what} must be above 0")))
            } else {
                Ok(Duration::from_millis(*v.get_ref()))
            }
        };
        let health = HealthSettings {
            heartbeat: positive(&c.heartbeat_ms, "heartbeat_ms")?,
            suspect_after: positive(&c.suspect_ms, "suspect_ms")?,
            dead_after: positive(&c.dead_after_ms, "dead_after_ms")?,
        };
        if health.suspect_after <= health.heartbeat {
            return Err(invalid(
                c.suspect_ms.span().start,
                "suspect_ms must be longer than heartbeat_ms, or every node is always suspect".into(),
            ));
        }
        if health.dead_after < health.suspect_after {
            return Err(invalid(
                c.dead_after_ms.span().start,
                "dead_after_ms must not be shorter than suspect_ms".into(),
            ));
        }
        let raft_heartbeat = positive(&c.raft_heartbeat_ms, "raft_heartbeat_ms")?.as_millis() as u64;
        let raft_snapshot_logs = *c.raft_snapshot_logs.get_ref();
        if raft_snapshot_logs == 0 {
            return Err(invalid(
                c.raft_snapshot_logs.span().start,
                "raft_snapshot_logs must be above 0".into(),
            ));
        }
        let oplog_retain_kb = *c.oplog_retain_kb.get_ref();
        let oplog_hold_kb = *c.oplog_hold_kb.get_ref();
        let oplog_retain_percent = Some(*c.oplog_retain_percent.get_ref()).filter(|&p| p > 0);
        if oplog_retain_kb == 0 {
            return Err(invalid(
                c.oplog_retain_kb.span().start,
                "oplog_retain_kb must be above 0".into(),
            ));
        }
        let budget_mb = *c.request_budget_mb.get_ref();
        let min_mb = (edgevec_proto::limits::MAX_FRAME_BYTES >> 20) as u64;
        if !(min_mb..=1 << 20).contains(&budget_mb) {
            return Err(invalid(
                c.request_budget_mb.span().start,
                format!("request_budget_mb must be between {min_mb} (the largest request) and 1048576"),
            ));
        }
        let (emin, emax) = *c.election_timeout_ms.get_ref();
        if emin <= raft_heartbeat || emax <= emin {
            return Err(invalid(
                c.election_timeout_ms.span().start,
                format!("election_timeout_ms must be [min, max] with raft_heartbeat_ms ({raft_heartbeat}) < min < max"),
            ));
        }

        Ok(ClusterConfig {
            path: path.to_path_buf(),
            name: raw.cluster.name,
            certs_dir: base.join(&raw.cluster.certs_dir),
            tokens,
            nodes,
            health,
            raft_heartbeat_ms: raft_heartbeat,
            election_timeout_ms: (emin, emax),
            raft_snapshot_logs,
            oplog_retain_bytes: oplog_retain_kb.saturating_mul(1024),
            oplog_retain_percent,
            oplog_hold_bytes: oplog_hold_kb.saturating_mul(1024),
            request_budget_bytes: (budget_mb << 20) as usize,
            fault_injection: raw.cluster.fault_injection,
            warnings,
        })
    }

    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The strongest token of the file, for CLI use on a dev cluster.
    pub fn strongest_token(&self) -> Option<&Token> {
        self.tokens.iter().max_by_key(|t| t.role)
    }

    pub fn cert_paths(&self) -> crate::certs::CertPaths {
        crate::certs::CertPaths::new(&self.certs_dir)
    }

    /// Certificates every node of this file needs.
    pub fn cert_names(&self) -> Vec<crate::certs::NodeName> {
        self.nodes
            .iter()
            .map(|n| crate::certs::NodeName {
                id: n.id,
                hosts: vec![n.addr.ip().to_string()],
            })
            .collect()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "t"

[[tokens]]
token = "admin-token-1"
role = "admin"

[[nodes]]
id = 1
addr = "127.0.0.1:7001"
data_dir = "data/n1"

[[nodes]]
id = 2
addr = "127.0.0.1:7002"
data_dir = "data/n2"
roles = ["data", "proxy"]
"#;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, Path::new("cluster.toml"), Path::new("/base"))
    }

    #[test]
    fn good_file_resolves_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[0].data_dir, Path::new("/base/data/n1"));
        assert_eq!(c.certs_dir, Path::new("/base/certs"));
        assert_eq!(c.nodes[0].roles, vec![Role::Meta, Role::Data, Role::Proxy]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.strongest_token().unwrap().role, TokenRole::Admin);
    }

    #[test]
    fn duplicate_id_names_the_line() {
        let text = GOOD.replace("id = 2", "id = 1");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("cluster.toml:15:") && err.contains("appears twice"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_addr_and_unknown_role() {
        let text = GOOD.replace("7002", "7001");
        assert!(parse(&text).unwrap_err().to_string().contains("used by two nodes"));
        let text = GOOD.replace("\"data\", \"proxy\"", "\"data\", \"router\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("line 18") && err.contains("router"), "{err}");
    }

    #[test]
    fn voters_checked() {
        let text = GOOD.replace("data_dir = \"data/n1\"", "data_dir = \"data/n1\"\nroles = [\"data\"]");
        let text = text.replace("roles = [\"data\", \"proxy\"]", "roles = [\"proxy\"]");
        assert!(parse(&text).unwrap_err().to_string().contains("meta"));
        let text = GOOD.replace("roles = [\"data\", \"proxy\"]", "roles = [\"meta\"]");
        let c = parse(&text).unwrap();
        assert!(c.warnings[0].contains("even number"), "{:?}", c.warnings);
    }

    #[test]
    fn timing_settings_checked() {
        let text = GOOD.replace("name = \"t\"", "name = \"t\"\nsuspect_ms = 100\nheartbeat_ms = 200");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("cluster.toml:4:") && err.contains("suspect_ms"), "{err}");
        let text = GOOD.replace("name = \"t\"", "name = \"t\"\nelection_timeout_ms = [50, 40]");
        assert!(parse(&text).unwrap_err().to_string().contains("election_timeout_ms"));
        let c = parse(GOOD).unwrap();
        assert_eq!(c.health.suspect_after, Duration::from_millis(1000));
        assert_eq!(c.election_timeout_ms, (250, 500));
    }

    #[test]
    fn role_names_round_trip() {
        for r in [Role::Meta, Role::Data, Role::Proxy] {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        assert!("chief".parse::<Role>().unwrap_err().contains("meta, data, proxy"));
    }

    #[test]
    fn request_budget_bounds() {
        let with = |v: &str| GOOD.replace("[cluster]\n", &format!("[cluster]\nrequest_budget_mb = {v}\n"));
        assert_eq!(parse(GOOD).unwrap().request_budget_bytes, 512 << 20);
        assert_eq!(parse(&with("64")).unwrap().request_budget_bytes, 64 << 20);
        let err = parse(&with("63")).unwrap_err().to_string();
        assert!(err.contains("request_budget_mb must be between 64"), "{err}");
    }

    #[test]
    fn op_log_retention_settings() {
        let with = |v: &str| GOOD.replace("[cluster]\n", &format!("[cluster]\n{v}\n"));
        let c = parse(GOOD).unwrap();
        assert_eq!((c.oplog_retain_bytes, c.oplog_retain_percent), (32 << 20, Some(10)));
        let c = parse(&with("oplog_retain_kb = 4096\noplog_retain_percent = 25")).unwrap();
        assert_eq!((c.oplog_retain_bytes, c.oplog_retain_percent), (4 << 20, Some(25)));
        assert_eq!(
            parse(&with("oplog_retain_percent = 0")).unwrap().oplog_retain_percent,
            None
        );
        let err = parse(&with("oplog_retain_percent = -1")).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("`-1`"), "{err}");
    }

    #[test]
    fn short_and_long_tokens_rejected() {
        let text = GOOD.replace("admin-token-1", "short");
        assert!(parse(&text).unwrap_err().to_string().contains("at least 8"));
        let text = GOOD.replace("admin-token-1", &"t".repeat(513));
        assert!(parse(&text).unwrap_err().to_string().contains("at most 512 bytes"));
        assert!(parse(&GOOD.replace("admin-token-1", &"t".repeat(512))).is_ok());
    }
}
