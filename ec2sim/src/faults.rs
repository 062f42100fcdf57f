//! A fault injector: a TCP proxy on the host's loopback in front of a real peer (moto as STS, the
//! simulated IMDS), which passes, delays, holds, resets, refuses or answers errors on demand.
//! The peer behind it stays real; only the path to it misbehaves.
//!
//! A fault applies to connections already open as well as to new ones (the proxy's HTTP clients
//! pool their connections, so a fault only on new ones would be bypassed): each chunk a client
//! sends is looked at under the fault of that moment.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// What the injector does to traffic, from the moment it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything.
    Pass,
    /// Hold each answer this long before passing it.
    Delay(Duration),
    /// Accept connections and read requests, but never pass them on nor answer: a stopped peer
    /// whose kernel still accepts. Held data is passed on once the fault is lifted.
    Hang,
    /// Reset every connection, open or new.
    Reset,
    /// Refuse new connections (nothing listens on the port); open ones are reset.
    Refuse,
    /// Answer every request with this HTTP status and an AWS query-API error body, without
    /// passing it on.
    HttpError(u16),
    /// Answer an AssumeRole that carries session tags as STS does for a role whose trust policy
    /// does not allow `sts:TagSession` (403 AccessDenied naming it); pass everything else.
    RefuseTags,
}

struct Shared {
    fault: Mutex<Fault>,
    accepted: AtomicU64,
    requests: AtomicU64,
    stopped: AtomicBool,
    /// The access key id of each SigV4-signed request seen, and when.
    signed_with: Mutex<Vec<(SystemTime, String)>>,
    /// The form parameters of each AssumeRole seen, in order.
    assume_role_calls: Mutex<Vec<Vec<(String, String)>>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap()
    }
}

/// A running injector; stops when dropped.
pub struct Injector {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

const POLL: Duration = Duration::from_millis(5);

impl Injector {
    /// Listen on a free loopback port and pass to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("injector binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            signed_with: Mutex::new(Vec::new()),
            assume_role_calls: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        std::thread::spawn(move || accept_loop(Some(listener), addr, target, accept_shared));
        Self { addr, shared }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for an endpoint flag.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Requests (whole HTTP requests a client sent) seen so far, whatever the fault did with
    /// them.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The access key id each signed request was signed with (SigV4 `Credential=`), and when it
    /// was seen.
    pub fn signed_with(&self) -> Vec<(SystemTime, String)> {
        self.shared.signed_with.lock().unwrap().clone()
    }

    /// Every AssumeRole seen so far, whatever the fault did with it.
    pub fn assume_role_calls(&self) -> Vec<AssumeRoleCall> {
        self.shared
            .assume_role_calls
            .lock()
            .unwrap()
            .iter()
            .map(|params| AssumeRoleCall(params.clone()))
            .collect()
    }
}

/// One AssumeRole's form parameters, decoded, in the order sent.
#[derive(Clone, Debug)]
pub struct AssumeRoleCall(pub Vec<(String, String)>);

impl AssumeRoleCall {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Its session tags (`Tags.member.N.Key`/`.Value`), by key.
    pub fn tags(&self) -> std::collections::BTreeMap<String, String> {
        (1..)
            .map_while(|n| {
                let key = self.param(&format!("Tags.member.{n}.Key"))?;
                let value = self.param(&format!("Tags.member.{n}.Value")).unwrap_or("");
                Some((key.to_owned(), value.to_owned()))
            })
            .collect()
    }

    /// Its transitive tag keys (`TransitiveTagKeys.member.N`), sorted.
    pub fn transitive(&self) -> Vec<String> {
        let mut keys: Vec<String> = (1..)
            .map_while(|n| self.param(&format!("TransitiveTagKeys.member.{n}")))
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// Whether it carries anything beyond the role, session name, duration and external id.
    pub fn carries_tags_or_identity(&self) -> bool {
        self.0.iter().any(|(k, _)| {
            k.starts_with("Tags.") || k.starts_with("TransitiveTagKeys.") || k == "SourceIdentity"
        })
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(
    mut listener: Option<TcpListener>,
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
) {
    while !shared.stopped.load(Ordering::SeqCst) {
        // Refuse: nothing listens on the port until the fault is lifted.
        if shared.fault() == Fault::Refuse {
            listener = None;
            std::thread::sleep(POLL);
            continue;
        }
        let current = match &listener {
            Some(l) => l,
            None => {
                // The port was given up while refusing; take it back (nobody else binds
                // loopback ports this test picked, and TIME_WAIT does not block a listener).
                match TcpListener::bind(addr) {
                    Ok(l) => listener.insert(l),
                    Err(_) => {
                        std::thread::sleep(POLL);
                        continue;
                    }
                }
            }
        };
        current.set_nonblocking(true).unwrap();
        match current.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                std::thread::spawn(move || serve(client, target, shared));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    let _ = stream.shutdown(Shutdown::Both);
}

/// One client connection: a pump each way, with the fault looked at per chunk.
fn serve(client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    client.set_nonblocking(false).unwrap();
    match shared.fault() {
        Fault::Reset | Fault::Refuse => return reset(&client),
        Fault::HttpError(status) => return answer_errors(client, status, Vec::new(), &shared),
        _ => {}
    }
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return reset(&client);
    };
    // A request went up since the last answer: the next answer is the one to delay.
    let asked = Arc::new(AtomicBool::new(false));
    let up = {
        let (client, server, shared, asked) = (
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            shared.clone(),
            asked.clone(),
        );
        std::thread::spawn(move || pump_up(client, server, &shared, &asked))
    };
    pump_down(server, client, &shared, &asked);
    let _ = up.join();
}

/// Waits out a hang; false if the connection must be reset instead.
fn hold(shared: &Shared) -> bool {
    loop {
        match shared.fault() {
            Fault::Hang if !shared.stopped.load(Ordering::SeqCst) => std::thread::sleep(POLL),
            Fault::Reset | Fault::Refuse => return false,
            _ => return true,
        }
    }
}

fn pump_up(mut client: TcpStream, mut server: TcpStream, shared: &Shared, asked: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        // Whole requests only: what a fault decides on is a request, however it was cut.
        while let Some(length) = whole_request(&pending) {
            let request: Vec<u8> = pending.drain(..length).collect();
            shared.requests.fetch_add(1, Ordering::SeqCst);
            record(&request, shared);
            if !hold(shared) {
                reset(&client);
                reset(&server);
                return;
            }
            match shared.fault() {
                Fault::HttpError(status) => {
                    reset(&server);
                    let mut rest = request;
                    rest.extend_from_slice(&pending);
                    return answer_errors(client, status, rest, shared);
                }
                Fault::RefuseTags if tagged_assume_role(&request) => {
                    if refuse_tags(&mut client, &request).is_err() {
                        return reset(&server);
                    }
                    continue;
                }
                _ => {}
            }
            asked.store(true, Ordering::SeqCst);
            if server.write_all(&request).is_err() {
                return reset(&client);
            }
        }
    }
}

/// The length of the first whole request in `pending` (its head and `Content-Length` bytes of
/// body), if it is all there.
fn whole_request(pending: &[u8]) -> Option<usize> {
    let end = find(pending, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    (pending.len() >= end + 4 + length).then_some(end + 4 + length)
}

/// A request's form body's parameters, decoded, when it is an AssumeRole.
fn assume_role_params(request: &[u8]) -> Option<Vec<(String, String)>> {
    let end = find(request, b"\r\n\r\n")?;
    let body = String::from_utf8_lossy(&request[end + 4..]);
    let params: Vec<(String, String)> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect();
    params
        .iter()
        .any(|(k, v)| k == "Action" && v == "AssumeRole")
        .then_some(params)
}

fn tagged_assume_role(request: &[u8]) -> bool {
    assume_role_params(request).is_some_and(|p| p.iter().any(|(k, _)| k.starts_with("Tags.")))
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// STS's answer to a tagged AssumeRole of a role whose trust policy does not allow
/// `sts:TagSession`.
fn refuse_tags(client: &mut TcpStream, request: &[u8]) -> std::io::Result<()> {
    let role = assume_role_params(request)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "RoleArn")
        .map(|(_, v)| v)
        .unwrap_or_default();
    let body = format!(
        "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>\
         <Message>User: arn:aws:sts::123456789012:assumed-role/instance/i-0 is not authorized \
         to perform: sts:TagSession on resource: {role}</Message></Error>\
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    );
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(answer.as_bytes())
}

fn pump_down(mut server: TcpStream, mut client: TcpStream, shared: &Shared, asked: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = client.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if !hold(shared) {
            reset(&client);
            reset(&server);
            return;
        }
        if let Fault::Delay(d) = shared.fault()
            && asked.swap(false, Ordering::SeqCst)
        {
            std::thread::sleep(d);
        }
        if client.write_all(&buf[..n]).is_err() {
            return reset(&server);
        }
    }
}

/// Answer every request on `client` with `status`, starting with the bytes already read.
fn answer_errors(mut client: TcpStream, status: u16, mut pending: Vec<u8>, shared: &Shared) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A whole request: the head, then Content-Length bytes of body.
        while let Some(length) = whole_request(&pending) {
            pending.drain(..length);
            // STS's own words: a 403 refuses the caller (AccessDenied, the sender's fault),
            // anything else is STS failing (InternalFailure).
            let (kind, code) = match status {
                403 => ("Sender", "AccessDenied"),
                _ => ("Receiver", "InternalFailure"),
            };
            let body = format!(
                "<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code>\
                 <Message>injected fault: {status}</Message></Error>\
                 <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
            );
            let answer = format!(
                "HTTP/1.1 {status} Injected\r\ncontent-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if client.write_all(answer.as_bytes()).is_err() {
                return;
            }
        }
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                shared.requests.fetch_add(1, Ordering::SeqCst);
                pending.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Note the access key id of a SigV4 `Authorization` header in `request`, if it carries one,
/// and an AssumeRole's parameters.
fn record(request: &[u8], shared: &Shared) {
    let text = String::from_utf8_lossy(request);
    if let Some(rest) = text.split("Credential=").nth(1)
        && let Some(key) = rest.split('/').next()
    {
        shared
            .signed_with
            .lock()
            .unwrap()
            .push((SystemTime::now(), key.to_owned()));
    }
    if let Some(params) = assume_role_params(request) {
        shared.assume_role_calls.lock().unwrap().push(params);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
