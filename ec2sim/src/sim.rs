//! The IMDS simulator: the EC2 instance metadata service as AWS documents it, for the simulated EC2
//! host. It runs inside its own network namespace (see [`crate::scene`]) and listens on
//! 169.254.169.254:80 and [fd00:ec2::254]:80 there.
//!
//! Behaviour follows the EC2 user guide: IMDSv2 session tokens from `PUT /latest/api/token`
//! (TTL 1–21600 s, `X-Forwarded-For` refused), `http-tokens` optional or required, `text/plain`
//! answers, listings whose sub-directories end in `/`, and the hop limit: the token response leaves
//! with IP TTL (IPv6 hop limit) equal to the configured value, so that with the default of 1 it dies
//! when the host forwards it to a container.
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{ConnectInfo, State, connect_info::Connected, rejection::StringRejection},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use rand::{Rng as _, distr::Alphanumeric};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// Request header carrying the requested token lifetime on `PUT /latest/api/token`.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Request header carrying a session token on GET/HEAD.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Longest token lifetime IMDS grants, in seconds (6 hours).
pub const MAX_TOKEN_TTL: u64 = 21_600;
/// The IP TTL used for every answer that is not a token response.
const DEFAULT_TTL: u32 = 64;

/// `HttpTokens` of the instance metadata options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    /// IMDSv1 and IMDSv2 both work: a request without a token is answered.
    Optional,
    /// IMDSv2 only: a request without a token gets 401.
    Required,
}

/// A set of temporary credentials, as the credentials document carries them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// RFC 3339, UTC, seconds precision.
    pub expiration: String,
}

impl Credentials {
    /// Random credentials of the right shape, valid for `lifetime`.
    pub fn random(lifetime: Duration) -> Self {
        Self {
            access_key_id: format!("ASIA{}", random_upper(16)),
            secret_access_key: random_string(40),
            token: random_string(300),
            expiration: rfc3339(SystemTime::now() + lifetime),
        }
    }
}

/// The simulator's configuration: the instance it pretends to be.
#[derive(Clone, Debug, clap::Args)]
pub struct Config {
    /// Addresses to listen on (repeatable).
    #[arg(long = "listen", required = true)]
    pub listen: Vec<SocketAddr>,
    /// IP TTL / IPv6 hop limit of token responses (`HttpPutResponseHopLimit`), 1–64.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub hop_limit: u32,
    /// `HttpTokens`: whether IMDSv1 (no token) requests are answered.
    #[arg(long, value_enum, default_value_t = HttpTokens::Optional)]
    pub http_tokens: HttpTokens,
    /// Name of the instance profile's role.
    #[arg(long, default_value = "InstanceRole")]
    pub role_name: String,
    /// Account that owns the instance.
    #[arg(long, default_value = "123456789012")]
    pub account_id: String,
    #[arg(long, default_value = "i-0123456789abcdef0")]
    pub instance_id: String,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// JSON file with the instance role's credentials (`AccessKeyId`, `SecretAccessKey`, `Token`,
    /// `Expiration`), e.g. from the scene's STS. Random credentials when absent.
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Rotate the instance role's credentials this often (e.g. `2s`): every set, the first too
    /// (`--credentials` is then ignored), is random and valid for three periods, as IMDS hands
    /// out new credentials well before the old ones expire.
    /// Each rotation is logged ("instance credentials issued", with the key id and expiration).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rotate_credentials_every: Option<Duration>,
    /// Body of `/latest/user-data`; 404 when empty, as on an instance without user data.
    #[arg(
        long,
        default_value = "#!/bin/sh\necho imds-sim user-data: not for containers\n"
    )]
    pub user_data: String,
}

/// What a path names: a directory (listing) or an item.
#[derive(Clone)]
enum Node {
    Dir(BTreeMap<String, Node>),
    Item(String),
}

struct Sim {
    config: Config,
    /// Rebuilt when the instance credentials rotate.
    tree: std::sync::RwLock<Node>,
    /// Issued tokens and when each expires.
    tokens: Mutex<HashMap<String, Instant>>,
}

/// The accepted connection: its peer, and a duplicate of its socket so a handler can set the
/// TTL of the response it is about to send.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    socket: Option<Arc<OwnedFd>>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self {
            peer: *stream.remote_addr(),
            // A dup of the fd refers to the same socket; None only if the process is out of fds,
            // in which case token requests fail with 500 rather than leave with the wrong TTL.
            socket: stream.io().as_fd().try_clone_to_owned().ok().map(Arc::new),
        }
    }
}

impl Conn {
    /// Set the IP TTL (IPv4) or unicast hop limit (IPv6) of what this connection sends next.
    fn set_ttl(&self, ttl: u32) -> std::io::Result<()> {
        let socket = self
            .socket
            .as_ref()
            .ok_or_else(|| std::io::Error::other("connection socket unavailable"))?;
        let socket = socket2::SockRef::from(socket.as_ref());
        if self.peer.is_ipv4() {
            socket.set_ttl_v4(ttl)
        } else {
            socket.set_unicast_hops_v6(ttl)
        }
    }
}

/// Run the simulator until the process is terminated. Prints `ready` on stdout once every
/// listener is bound, so a harness can wait for it without polling.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let credentials = match (&config.credentials, config.rotate_credentials_every) {
        (_, Some(every)) => Credentials::random(every * 3),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading credentials file {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing credentials file {}", path.display()))?
        }
        (None, None) => Credentials::random(Duration::from_secs(6 * 3600)),
    };
    tracing::info!(
        access_key_id = credentials.access_key_id,
        expiration = credentials.expiration,
        "instance credentials issued"
    );
    let sim = Arc::new(Sim {
        tree: std::sync::RwLock::new(build_tree(&config, &credentials)),
        config,
        tokens: Mutex::new(HashMap::new()),
    });
    if let Some(every) = sim.config.rotate_credentials_every {
        let sim = sim.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticks.tick().await;
                let credentials = Credentials::random(every * 3);
                tracing::info!(
                    access_key_id = credentials.access_key_id,
                    expiration = credentials.expiration,
                    "instance credentials issued"
                );
                *sim.tree.write().expect("tree poisoned") = build_tree(&sim.config, &credentials);
            }
        });
    }
    let app = Router::new().fallback(handle).with_state(sim.clone());

    let mut servers = tokio::task::JoinSet::new();
    for addr in &sim.config.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(%addr, hop_limit = sim.config.hop_limit, http_tokens = ?sim.config.http_tokens, "listening");
        let service = app.clone().into_make_service_with_connect_info::<Conn>();
        servers.spawn(async move { axum::serve(listener, service).await });
    }
    println!("ready");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    if let Some(result) = servers.join_next().await {
        result??;
    }
    Ok(())
}

async fn handle(
    State(sim): State<Arc<Sim>>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<String, StringRejection>,
) -> Response {
    let path = uri.path();
    let token_use = token_use(&headers);
    let response = sim.answer(&conn, &method, path, &headers, body.is_ok());
    tracing::info!(
        peer = %conn.peer,
        %method,
        path,
        token = token_use,
        status = response.status().as_u16(),
        "request"
    );
    response
}

/// How a request used a token, for the log: "none", or "present".
fn token_use(headers: &HeaderMap) -> &'static str {
    if headers.contains_key(TOKEN_HEADER) {
        "present"
    } else {
        "none"
    }
}

impl Sim {
    fn answer(
        &self,
        conn: &Conn,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body_ok: bool,
    ) -> Response {
        if !body_ok {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        }
        match *method {
            Method::PUT => self.put(conn, path, headers),
            Method::GET | Method::HEAD => {
                // Every answer that is not a token response leaves with the normal TTL, so a
                // keep-alive connection that asked for a token first is not stuck at hop limit 1.
                if let Err(err) = conn.set_ttl(DEFAULT_TTL) {
                    tracing::error!(%err, "resetting the IP TTL");
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
                }
                self.get(path, headers, *method == Method::HEAD)
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed"),
        }
    }

    fn put(&self, conn: &Conn, path: &str, headers: &HeaderMap) -> Response {
        if path != "/latest/api/token" {
            // Version paths (`/2021-03-23/api/token`) are refused; PUT on anything else is not a
            // method the path supports.
            return if path.ends_with("/api/token") {
                text(StatusCode::FORBIDDEN, "Forbidden")
            } else {
                text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            };
        }
        // The anti-SSRF rule: a token request that went through a proxy is refused.
        if headers.contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "Forbidden");
        }
        let Some(ttl) = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ttl| (1..=MAX_TOKEN_TTL).contains(ttl))
        else {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        };
        let token = random_string(56);
        let now = Instant::now();
        {
            let mut tokens = self.tokens.lock().expect("token table poisoned");
            tokens.retain(|_, expiry| *expiry > now);
            tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        }
        // `HttpPutResponseHopLimit`: the token leaves with this TTL and dies after that many hops.
        if let Err(err) = conn.set_ttl(self.config.hop_limit) {
            tracing::error!(%err, "setting the IP TTL of the token response");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error");
        }
        let mut response = text(StatusCode::OK, &token);
        response.headers_mut().insert(
            TTL_HEADER,
            HeaderValue::from_str(&ttl.to_string()).expect("digits are a valid header value"),
        );
        response
    }

    fn get(&self, path: &str, headers: &HeaderMap, head: bool) -> Response {
        match headers.get(TOKEN_HEADER) {
            Some(token) => {
                let valid = token.to_str().ok().is_some_and(|token| {
                    self.tokens
                        .lock()
                        .expect("token table poisoned")
                        .get(token)
                        .is_some_and(|expiry| *expiry > Instant::now())
                });
                if !valid {
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized");
                }
            }
            None if self.config.http_tokens == HttpTokens::Required => {
                return text(StatusCode::UNAUTHORIZED, "Unauthorized");
            }
            None => {}
        }
        let (status, body) = match lookup(&self.tree.read().expect("tree poisoned"), path) {
            Some(body) => (StatusCode::OK, body),
            None => (StatusCode::NOT_FOUND, "Not Found".to_owned()),
        };
        if head {
            // The headers of the GET, with its length, and no body.
            let mut response = text(status, "");
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            response
        } else {
            text(status, &body)
        }
    }
}

/// The answer for `path`: an item's content, or a directory's listing (sub-directories end in
/// `/`). A directory is found with or without its trailing slash; an item only without.
fn lookup(tree: &Node, path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    let (rest, want_dir) = match rest.strip_suffix('/') {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let mut node = tree;
    if !rest.is_empty() {
        for segment in rest.split('/') {
            match node {
                Node::Dir(children) => node = children.get(segment)?,
                Node::Item(_) => return None,
            }
        }
    }
    match node {
        Node::Dir(children) => Some(
            children
                .iter()
                .map(|(name, child)| match child {
                    Node::Dir(_) => format!("{name}/"),
                    Node::Item(_) => name.clone(),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        Node::Item(_) if want_dir => None,
        Node::Item(body) => Some(body.clone()),
    }
}

fn dir<const N: usize>(entries: [(&str, Node); N]) -> Node {
    Node::Dir(
        entries
            .into_iter()
            .map(|(name, node)| (name.to_owned(), node))
            .collect(),
    )
}

fn item(body: impl Into<String>) -> Node {
    Node::Item(body.into())
}

/// The credentials document, laid out as IMDS lays it out.
pub fn credentials_document(credentials: &Credentials, last_updated: &str) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : {},\n  \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \"Expiration\" : {}\n}}",
        q(last_updated),
        q(&credentials.access_key_id),
        q(&credentials.secret_access_key),
        q(&credentials.token),
        q(&credentials.expiration),
    )
}

fn build_tree(config: &Config, credentials: &Credentials) -> Node {
    let now = rfc3339(SystemTime::now());
    let az = format!("{}a", config.region);
    let local_ipv4 = "172.31.16.10";
    let hostname = format!("ip-172-31-16-10.{}.compute.internal", config.region);
    let instance_type = "m7i.large";
    let ami_id = "ami-0abcdef1234567890";
    let iam_info = serde_json::to_string_pretty(&serde_json::json!({
        "Code": "Success",
        "LastUpdated": now,
        "InstanceProfileArn": format!("arn:aws:iam::{}:instance-profile/{}", config.account_id, config.role_name),
        "InstanceProfileId": "AIPAEXAMPLEINSTANCEPROFILE",
    }))
    .expect("json serialises");
    let document = serde_json::to_string_pretty(&serde_json::json!({
        "accountId": config.account_id,
        "architecture": "x86_64",
        "availabilityZone": az,
        "imageId": ami_id,
        "instanceId": config.instance_id,
        "instanceType": instance_type,
        "pendingTime": now,
        "privateIp": local_ipv4,
        "region": config.region,
        "version": "2017-09-30",
    }))
    .expect("json serialises");
    let identity_credentials = Credentials::random(Duration::from_secs(6 * 3600));

    let meta_data = dir([
        ("ami-id", item(ami_id)),
        ("hostname", item(hostname)),
        (
            "iam",
            dir([
                ("info", item(iam_info)),
                (
                    "security-credentials",
                    dir([(
                        config.role_name.as_str(),
                        item(credentials_document(credentials, &now)),
                    )]),
                ),
            ]),
        ),
        (
            "identity-credentials",
            dir([(
                "ec2",
                dir([
                    ("info", item(iam_info_identity(config, &now))),
                    (
                        "security-credentials",
                        dir([(
                            "ec2-instance",
                            item(credentials_document(&identity_credentials, &now)),
                        )]),
                    ),
                ]),
            )]),
        ),
        ("instance-id", item(config.instance_id.clone())),
        ("instance-type", item(instance_type)),
        ("local-ipv4", item(local_ipv4)),
        (
            "placement",
            dir([
                ("availability-zone", item(az.clone())),
                ("region", item(config.region.clone())),
            ]),
        ),
    ]);
    let mut latest = BTreeMap::new();
    latest.insert("meta-data".to_owned(), meta_data);
    latest.insert(
        "dynamic".to_owned(),
        dir([("instance-identity", dir([("document", item(document))]))]),
    );
    if !config.user_data.is_empty() {
        latest.insert("user-data".to_owned(), item(config.user_data.clone()));
    }
    // IMDS serves the same tree under each dated API version as under `latest`.
    let mut versions: BTreeMap<String, Node> = API_VERSIONS
        .iter()
        .map(|v| (v.to_string(), Node::Dir(latest.clone())))
        .collect();
    versions.insert("latest".to_owned(), Node::Dir(latest));
    Node::Dir(versions)
}

/// Dated API versions the simulator serves besides `latest` (a few of IMDS's).
pub const API_VERSIONS: [&str; 3] = ["2016-09-02", "2021-03-23", "2022-09-24"];

fn iam_info_identity(config: &Config, now: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "Code": "Success",
        "LastUpdated": now,
        "AccountId": config.account_id,
    }))
    .expect("json serialises")
}

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        body.to_owned(),
    )
        .into_response()
}

/// UTC, seconds precision: `2026-11-22T04:00:00Z`.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn random_string(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn random_upper(len: usize) -> String {
    random_string(len).to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            listen: vec![],
            hop_limit: 1,
            http_tokens: HttpTokens::Optional,
            role_name: "InstanceRole".into(),
            account_id: "123456789012".into(),
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            credentials: None,
            rotate_credentials_every: None,
            user_data: String::new(),
        }
    }

    #[test]
    fn listings_mark_directories_with_a_slash() {
        let tree = build_tree(&config(), &Credentials::random(Duration::from_secs(60)));
        assert_eq!(
            lookup(&tree, "/latest/meta-data/iam/").as_deref(),
            Some("info\nsecurity-credentials/")
        );
        assert_eq!(
            lookup(&tree, "/latest/meta-data/iam").as_deref(),
            Some("info\nsecurity-credentials/")
        );
        assert_eq!(
            lookup(&tree, "/latest/meta-data/iam/security-credentials/").as_deref(),
            Some("InstanceRole")
        );
    }

    #[test]
    fn items_do_not_take_a_trailing_slash_and_unknown_paths_are_absent() {
        let tree = build_tree(&config(), &Credentials::random(Duration::from_secs(60)));
        assert_eq!(
            lookup(&tree, "/latest/meta-data/instance-id").as_deref(),
            Some("i-0123456789abcdef0")
        );
        assert_eq!(lookup(&tree, "/latest/meta-data/instance-id/"), None);
        assert_eq!(
            lookup(&tree, "/2021-03-23/meta-data/instance-id"),
            lookup(&tree, "/latest/meta-data/instance-id"),
            "a dated version serves the same tree"
        );
        assert_eq!(lookup(&tree, "/latest/meta-data/nope"), None);
        assert_eq!(lookup(&tree, "/latest/meta-data/../meta-data/ami-id"), None);
        assert_eq!(lookup(&tree, "/latest//meta-data"), None);
        // No user data configured: 404, as on an instance launched without it.
        assert_eq!(lookup(&tree, "/latest/user-data"), None);
    }
}
