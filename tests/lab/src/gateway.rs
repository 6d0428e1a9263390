//! A double of Azure DocumentDB's Microsoft Entra login: a TLS proxy on 127.0.0.1 that plays the
//! server side of MONGODB-OIDC (FACTS §5) in front of a SecantusDB server, which has no OIDC.
//!
//! The gateway answers `saslStart` itself, accepts speculative authentication in `hello`, refuses
//! commands before login (13) and after the token's expiry (391), and forwards everything else
//! byte for byte, so the real driver exercises its whole OIDC machine flow against a real server.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, RawDocument, doc};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::pki::CertFiles;

/// What a token verifier concludes about an access token.
#[derive(Clone, Debug)]
pub struct TokenGrant {
    /// The token's `oid`: DocumentDB names the cluster user after it.
    pub principal: String,
    /// After this instant commands on the connection get 391 until a new `saslStart` succeeds.
    pub expires_at: SystemTime,
}

/// Verifies signature, audience, expiry and registered-user; `Err(message)` means refuse (code 18).
pub type TokenVerifier = Arc<dyn Fn(&str) -> Result<TokenGrant, String> + Send + Sync>;

/// Cumulative counters a test reads to see which path the driver took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// `hello`s whose `speculativeAuthenticate` token verified (the reply echoed the acceptance).
    pub speculative_accepted: u64,
    /// `hello`s whose `speculativeAuthenticate` was left unanswered (the driver then runs `saslStart`).
    pub speculative_declined: u64,
    /// `saslStart`s answered with `done: true`.
    pub sasl_start_accepted: u64,
    /// `saslStart`s answered with code 18 `AuthenticationFailed`.
    pub sasl_start_refused: u64,
    /// Commands answered with code 391 `ReauthenticationRequired`.
    pub reauth_required_sent: u64,
    /// Commands answered with code 13 `Unauthorized`.
    pub unauthorized_sent: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    speculative_accepted: AtomicU64,
    speculative_declined: AtomicU64,
    sasl_start_accepted: AtomicU64,
    sasl_start_refused: AtomicU64,
    reauth_required_sent: AtomicU64,
    unauthorized_sent: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> GatewayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GatewayStats {
            connections: get(&self.connections),
            speculative_accepted: get(&self.speculative_accepted),
            speculative_declined: get(&self.speculative_declined),
            sasl_start_accepted: get(&self.sasl_start_accepted),
            sasl_start_refused: get(&self.sasl_start_refused),
            reauth_required_sent: get(&self.reauth_required_sent),
            unauthorized_sent: get(&self.unauthorized_sent),
        }
    }
}

/// A running gateway; dropping it stops accepting and closes every connection.
pub struct OidcGateway {
    port: u16,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl OidcGateway {
    /// Serves TLS on a free 127.0.0.1 port with `cert`, forwarding to 127.0.0.1:`backend_port`.
    pub async fn start(backend_port: u16, cert: &CertFiles, verifier: TokenVerifier) -> Result<OidcGateway> {
        let acceptor = TlsAcceptor::from(Arc::new(crate::https::server_config(cert)?));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.context("cannot bind the OIDC gateway")?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(listener, acceptor, backend_port, verifier, counters.clone()));
        debug!(port, backend_port, "OIDC gateway listening");
        Ok(OidcGateway { port, counters, accept })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn stats(&self) -> GatewayStats {
        self.counters.snapshot()
    }
}

impl Drop for OidcGateway {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connections: aborting it drops both.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, backend_port: u16, verifier: TokenVerifier, counters: Arc<Counters>) {
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    next_id += 1;
                    Counters::bump(&counters.connections);
                    let session = Arc::new(Session::new(next_id, verifier.clone(), counters.clone()));
                    connections.spawn(serve(session, tcp, acceptor.clone(), backend_port));
                }
                Err(err) => {
                    warn!("OIDC gateway cannot accept: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Aborts a task when the connection that spawned it goes away (also when that one is aborted).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(session: Arc<Session>, tcp: TcpStream, acceptor: TlsAcceptor, backend_port: u16) {
    let id = session.id;
    match serve_connection(session, tcp, acceptor, backend_port).await {
        Ok(()) => debug!(connection = id, "connection closed"),
        Err(err) => debug!(connection = id, "connection ended: {err:#}"),
    }
}

async fn serve_connection(session: Arc<Session>, tcp: TcpStream, acceptor: TlsAcceptor, backend_port: u16) -> Result<()> {
    tcp.set_nodelay(true)?;
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed")?;
    let backend = TcpStream::connect(("127.0.0.1", backend_port)).await.context("cannot reach the backend")?;
    backend.set_nodelay(true)?;
    let (client_rd, client_wr) = tokio::io::split(tls);
    let (backend_rd, backend_wr) = backend.into_split();
    // One writer to the client: gateway answers and pumped backend replies never interleave.
    let (to_client, queue) = mpsc::channel(64);
    let writer = tokio::spawn(write_loop(client_wr, queue));
    let _writer_guard = AbortOnDrop(writer.abort_handle());
    // The backend is pumped independently of requests: an exhaust hello gets many replies.
    let result = tokio::select! {
        r = client_loop(session.clone(), client_rd, backend_wr, to_client.clone()) => r,
        r = backend_loop(session, backend_rd, to_client) => r,
    };
    // Both senders are gone now, so the writer ends once what is queued is written.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    result
}

async fn write_loop<W: AsyncWrite + Unpin>(mut client: W, mut queue: mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
    while let Some(msg) = queue.recv().await {
        client.write_all(&msg).await?;
        if queue.is_empty() {
            client.flush().await?;
        }
    }
    client.shutdown().await
}

/// What the request loop does with one client message.
enum Outcome {
    /// Send to the backend: the original bytes, or a rewritten message (and a speculative login
    /// to confirm when the backend replies).
    Backend(Option<Vec<u8>>, Option<TokenGrant>),
    /// Answer the client with this reply (already encoded), or not at all for a moreToCome request.
    Client(Option<Vec<u8>>),
}

async fn client_loop<R: AsyncRead + Unpin>(
    session: Arc<Session>,
    mut client: R,
    mut backend: OwnedWriteHalf,
    to_client: mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    while let Some(mut msg) = read_message(&mut client).await? {
        let head = Header::of(&msg).context("short message")?;
        let outcome = match head.op_code {
            OP_MSG => {
                strip_checksum(&mut msg);
                let op = OpMsg::parse(&msg)?;
                let raw = RawDocument::from_bytes(op.body)?;
                match session.route(first_key(raw)?, raw, raw.get_str("$db").ok())? {
                    Route::Forward => Outcome::Backend(None, None),
                    Route::Rewrite(body, grant) => Outcome::Backend(Some(op.encode_with_body(head, &to_bytes(&body)?)), grant),
                    // A fire-and-forget request (moreToCome) must not get an answer.
                    Route::Answer(_) if op.flags & MORE_TO_COME != 0 => Outcome::Client(None),
                    Route::Answer(reply) => Outcome::Client(Some(encode_op_msg_reply(session.next_request_id(), head.request_id, &reply)?)),
                }
            }
            OP_QUERY => {
                let op = OpQuery::parse(&msg)?;
                let outer = RawDocument::from_bytes(op.query)?;
                // Legacy drivers may wrap the command as `{$query: {...}, $readPreference: ...}`.
                let wrapper = Some(first_key(outer)?).filter(|key| matches!(*key, "$query" | "query"));
                let command = match wrapper {
                    Some(key) => outer.get_document(key)?,
                    None => outer,
                };
                match session.route(first_key(command)?, command, op.collection.split('.').next())? {
                    Route::Forward => Outcome::Backend(None, None),
                    Route::Rewrite(body, grant) => {
                        let query = match wrapper {
                            Some(key) => {
                                let mut outer = Document::try_from(outer)?;
                                outer.insert(key, body);
                                outer
                            }
                            None => body,
                        };
                        Outcome::Backend(Some(op.encode_with_query(head, &to_bytes(&query)?)), grant)
                    }
                    Route::Answer(reply) => Outcome::Client(Some(encode_op_reply(session.next_request_id(), head.request_id, &reply)?)),
                }
            }
            OP_COMPRESSED => bail!("OP_COMPRESSED although the gateway never negotiates compression"),
            other => bail!("unsupported opCode {other}"),
        };
        match outcome {
            Outcome::Backend(rewritten, grant) => {
                if let Some(grant) = grant {
                    session.auth().speculative.insert(head.request_id, grant);
                }
                backend.write_all(rewritten.as_deref().unwrap_or(&msg)).await?;
            }
            Outcome::Client(None) => debug!(connection = session.id, "not answering a moreToCome request"),
            Outcome::Client(Some(reply)) => {
                if to_client.send(reply).await.is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

async fn backend_loop(session: Arc<Session>, mut backend: OwnedReadHalf, to_client: mpsc::Sender<Vec<u8>>) -> Result<()> {
    while let Some(msg) = read_message(&mut backend).await? {
        let msg = session.on_backend_reply(msg);
        if to_client.send(msg).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Commands a client may run before it logs in (and after its token expired).
const OPEN_COMMANDS: &[&str] = &["hello", "isMaster", "ismaster", "ping", "buildInfo", "buildinfo", "saslStart", "saslContinue", "endSessions"];

/// What happens to one client request.
enum Route {
    /// The original bytes go to the backend.
    Forward,
    /// This body replaces the command's; with a grant, the backend's reply gets the speculative acceptance.
    Rewrite(Document, Option<TokenGrant>),
    /// The gateway answers this itself; nothing reaches the backend.
    Answer(Document),
}

#[derive(Default)]
struct AuthState {
    grant: Option<TokenGrant>,
    /// Speculative logins that verified, by the requestID of their hello, until the backend replies.
    speculative: HashMap<i32, TokenGrant>,
}

/// One client connection's login state, shared by its request loop and its backend pump.
struct Session {
    id: u64,
    verifier: TokenVerifier,
    counters: Arc<Counters>,
    auth: Mutex<AuthState>,
    next_request_id: AtomicI32,
}

impl Session {
    fn new(id: u64, verifier: TokenVerifier, counters: Arc<Counters>) -> Self {
        // Gateway replies get their own requestID range so they are easy to tell apart in captures.
        Self { id, verifier, counters, auth: Mutex::default(), next_request_id: AtomicI32::new(1 << 30) }
    }

    fn auth(&self) -> MutexGuard<'_, AuthState> {
        // The state stays consistent even if a holder panicked: every update is a single assignment.
        self.auth.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_request_id(&self) -> i32 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    fn route(&self, name: &str, command: &RawDocument, db: Option<&str>) -> Result<Route> {
        match name {
            "saslStart" => Ok(Route::Answer(self.sasl_start(&Document::try_from(command)?, db))),
            // The gateway's conversations finish in one step, so there is never one to continue.
            "saslContinue" => Ok(Route::Answer(error_reply(17, "ProtocolError", "No SASL session state found"))),
            "hello" | "isMaster" | "ismaster" => self.hello(command),
            _ if OPEN_COMMANDS.contains(&name) => Ok(Route::Forward),
            _ => {
                let auth = self.auth();
                match &auth.grant {
                    None => {
                        Counters::bump(&self.counters.unauthorized_sent);
                        debug!(connection = self.id, "refusing {name} before login");
                        Ok(Route::Answer(error_reply(13, "Unauthorized", &format!("command {name} requires authentication"))))
                    }
                    Some(grant) if SystemTime::now() >= grant.expires_at => {
                        Counters::bump(&self.counters.reauth_required_sent);
                        debug!(connection = self.id, principal = %grant.principal, "token expired: 391 for {name}");
                        Ok(Route::Answer(error_reply(391, "ReauthenticationRequired", "Access token expired; reauthentication required")))
                    }
                    Some(_) => Ok(Route::Forward),
                }
            }
        }
    }

    /// Verifies a one-step MONGODB-OIDC `saslStart`; success logs the connection in.
    fn sasl_start(&self, command: &Document, db: Option<&str>) -> Document {
        let verdict = if command.get_str("mechanism").ok() != Some("MONGODB-OIDC") {
            Err("mechanism is not MONGODB-OIDC".to_string())
        } else if db != Some("$external") {
            Err(format!("database is {db:?}, not $external"))
        } else {
            match jwt_of(command) {
                Some(token) => self.verify(&token),
                None => Err("payload has no jwt".to_string()),
            }
        };
        match verdict {
            Ok(grant) => {
                Counters::bump(&self.counters.sasl_start_accepted);
                debug!(connection = self.id, principal = %grant.principal, "saslStart accepted");
                self.auth().grant = Some(grant);
                doc! {"conversationId": 1, "done": true, "payload": empty_payload(), "ok": 1.0}
            }
            Err(why) => {
                Counters::bump(&self.counters.sasl_start_refused);
                debug!(connection = self.id, "saslStart refused: {why}");
                error_reply(18, "AuthenticationFailed", "Authentication failed.")
            }
        }
    }

    /// Takes `compression` and `speculativeAuthenticate` out of a hello before the backend sees it.
    fn hello(&self, command: &RawDocument) -> Result<Route> {
        let has = |key| command.get(key).ok().flatten().is_some();
        if !has("compression") && !has("speculativeAuthenticate") {
            return Ok(Route::Forward);
        }
        let mut body = Document::try_from(command)?;
        // Compressed messages are not parsed here, so the client must never be offered a compressor.
        body.remove("compression");
        let grant = match body.remove("speculativeAuthenticate") {
            None => None,
            Some(speculative) => {
                let grant = self.speculative(&speculative);
                if grant.is_none() {
                    Counters::bump(&self.counters.speculative_declined);
                }
                grant
            }
        };
        Ok(Route::Rewrite(body, grant))
    }

    fn speculative(&self, speculative: &Bson) -> Option<TokenGrant> {
        let sasl = speculative.as_document()?;
        if sasl.get_str("mechanism").ok() != Some("MONGODB-OIDC") || sasl.get_str("db").ok() != Some("$external") {
            debug!(connection = self.id, "declining speculative authentication that is not MONGODB-OIDC on $external");
            return None;
        }
        match self.verify(&jwt_of(sasl)?) {
            Ok(grant) => Some(grant),
            Err(why) => {
                debug!(connection = self.id, "declining speculative authentication: {why}");
                None
            }
        }
    }

    fn verify(&self, token: &str) -> Result<TokenGrant, String> {
        debug!(connection = self.id, token_len = token.len(), "verifying an access token");
        (self.verifier)(token)
    }

    /// Adds the speculative acceptance to the reply of a hello whose token verified.
    fn on_backend_reply(&self, msg: Vec<u8>) -> Vec<u8> {
        let Some(head) = Header::of(&msg) else { return msg };
        let grant = {
            let mut auth = self.auth();
            if auth.speculative.is_empty() {
                return msg;
            }
            match auth.speculative.remove(&head.response_to) {
                Some(grant) => grant,
                None => return msg,
            }
        };
        match with_speculative_acceptance(&msg) {
            Ok(Some(accepted)) => {
                Counters::bump(&self.counters.speculative_accepted);
                debug!(connection = self.id, principal = %grant.principal, "speculative authentication accepted");
                self.auth().grant = Some(grant);
                accepted
            }
            Ok(None) => {
                debug!(connection = self.id, "backend failed the hello: no speculative acceptance");
                msg
            }
            Err(err) => {
                debug!(connection = self.id, "cannot rewrite the backend's hello reply: {err:#}");
                msg
            }
        }
    }
}

/// The access token in a MONGODB-OIDC `saslStart`: `payload` is BinData(0, bson `{jwt}`).
fn jwt_of(sasl: &Document) -> Option<String> {
    let payload = sasl.get_binary_generic("payload").ok()?;
    let inner = Document::from_reader(payload.as_slice()).ok()?;
    inner.get_str("jwt").ok().map(str::to_string)
}

fn empty_payload() -> Binary {
    Binary { subtype: BinarySubtype::Generic, bytes: Vec::new() }
}

fn error_reply(code: i32, code_name: &str, errmsg: &str) -> Document {
    doc! {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}
}

fn is_ok(reply: &Document) -> bool {
    match reply.get("ok") {
        Some(Bson::Double(ok)) => *ok == 1.0,
        Some(Bson::Int32(ok)) => *ok == 1,
        Some(Bson::Int64(ok)) => *ok == 1,
        Some(Bson::Boolean(ok)) => *ok,
        _ => false,
    }
}

fn first_key(doc: &RawDocument) -> Result<&str> {
    match doc.iter().next() {
        Some(entry) => Ok(entry?.0),
        None => bail!("empty command document"),
    }
}

fn to_bytes(doc: &Document) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    doc.to_writer(&mut bytes)?;
    Ok(bytes)
}

// The wire protocol, just as much as a proxy needs.

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_COMPRESSED: i32 = 2012;
const OP_MSG: i32 = 2013;
const CHECKSUM_PRESENT: u32 = 1;
const MORE_TO_COME: u32 = 1 << 1;
const HEADER_LEN: usize = 16;
/// mongod's limit is 48 MB; a little slack for the header and document sequences.
const MAX_MESSAGE_LEN: usize = 64 << 20;

#[derive(Clone, Copy, Debug)]
struct Header {
    request_id: i32,
    response_to: i32,
    op_code: i32,
}

impl Header {
    fn of(msg: &[u8]) -> Option<Header> {
        Some(Header { request_id: i32_at(msg, 4)?, response_to: i32_at(msg, 8)?, op_code: i32_at(msg, 12)? })
    }

    fn write(out: &mut Vec<u8>, request_id: i32, response_to: i32, op_code: i32) {
        out.extend_from_slice(&0i32.to_le_bytes()); // messageLength, set by `finish`
        out.extend_from_slice(&request_id.to_le_bytes());
        out.extend_from_slice(&response_to.to_le_bytes());
        out.extend_from_slice(&op_code.to_le_bytes());
    }
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    let word: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(i32::from_le_bytes(word))
}

/// Sets messageLength; messages are bounded by MAX_MESSAGE_LEN, far below i32::MAX.
fn finish(mut msg: Vec<u8>) -> Vec<u8> {
    let len = i32::try_from(msg.len()).unwrap_or(i32::MAX);
    msg[..4].copy_from_slice(&len.to_le_bytes());
    msg
}

/// Reads one whole message; `None` when the peer closed between messages.
async fn read_message<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        let n = reader.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        got += n;
    }
    let declared = i32::from_le_bytes(len);
    let Some(length) = usize::try_from(declared).ok().filter(|l| (HEADER_LEN..=MAX_MESSAGE_LEN).contains(l)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("message length {declared}")));
    };
    let mut msg = vec![0u8; length];
    msg[..4].copy_from_slice(&len);
    reader.read_exact(&mut msg[4..]).await?;
    Ok(Some(msg))
}

/// Drops an OP_MSG's CRC-32C: the backend accepts messages without one, and the gateway never
/// rewrites a message it would then have to re-checksum. (The driver sends none by default.)
fn strip_checksum(msg: &mut Vec<u8>) {
    let Some(flags) = i32_at(msg, 16) else { return };
    let flags = flags as u32;
    if flags & CHECKSUM_PRESENT == 0 || msg.len() < 24 {
        return;
    }
    msg.truncate(msg.len() - 4);
    msg[16..20].copy_from_slice(&(flags & !CHECKSUM_PRESENT).to_le_bytes());
    let len = i32::try_from(msg.len()).unwrap_or(i32::MAX);
    msg[..4].copy_from_slice(&len.to_le_bytes());
}

/// An OP_MSG: flagBits, one body (kind 0) and any document sequences (kind 1, kept raw).
struct OpMsg<'a> {
    flags: u32,
    body: &'a [u8],
    sequences: Vec<&'a [u8]>,
}

impl<'a> OpMsg<'a> {
    fn parse(msg: &'a [u8]) -> Result<OpMsg<'a>> {
        let flags = i32_at(msg, HEADER_LEN).context("OP_MSG without flagBits")? as u32;
        let end = if flags & CHECKSUM_PRESENT != 0 { msg.len().saturating_sub(4) } else { msg.len() };
        let mut pos = HEADER_LEN + 4;
        let (mut body, mut sequences) = (None, Vec::new());
        while pos < end {
            let kind = msg[pos];
            // Both section kinds start with an int32 size: the document's or the sequence's.
            let size = i32_at(msg, pos + 1).and_then(|s| usize::try_from(s).ok()).filter(|s| *s >= 5);
            let Some(stop) = size.map(|s| pos + 1 + s).filter(|stop| *stop <= end) else {
                bail!("OP_MSG section at {pos} overruns the message");
            };
            match kind {
                0 if body.is_none() => body = Some(&msg[pos + 1..stop]),
                0 => bail!("OP_MSG with two body sections"),
                1 => sequences.push(&msg[pos..stop]),
                other => bail!("OP_MSG section kind {other}"),
            }
            pos = stop;
        }
        Ok(OpMsg { flags, body: body.context("OP_MSG without a body section")?, sequences })
    }

    /// The same message (ids, flags, sequences) with another body and without a checksum.
    fn encode_with_body(&self, head: Header, body: &[u8]) -> Vec<u8> {
        encode_op_msg(head.request_id, head.response_to, self.flags, body, &self.sequences)
    }
}

fn encode_op_msg(request_id: i32, response_to: i32, flags: u32, body: &[u8], sequences: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 5 + body.len() + sequences.iter().map(|s| s.len()).sum::<usize>());
    Header::write(&mut out, request_id, response_to, OP_MSG);
    out.extend_from_slice(&(flags & !CHECKSUM_PRESENT).to_le_bytes());
    out.push(0);
    out.extend_from_slice(body);
    for sequence in sequences {
        out.extend_from_slice(sequence);
    }
    finish(out)
}

fn encode_op_msg_reply(request_id: i32, response_to: i32, body: &Document) -> Result<Vec<u8>> {
    Ok(encode_op_msg(request_id, response_to, 0, &to_bytes(body)?, &[]))
}

/// An OP_REPLY with one document (the answer to a legacy OP_QUERY command).
fn encode_op_reply(request_id: i32, response_to: i32, body: &Document) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    Header::write(&mut out, request_id, response_to, OP_REPLY);
    out.extend_from_slice(&0i32.to_le_bytes()); // responseFlags
    out.extend_from_slice(&0i64.to_le_bytes()); // cursorID
    out.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
    out.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
    body.to_writer(&mut out)?;
    Ok(finish(out))
}

/// A legacy OP_QUERY (only the handshake of old drivers uses it on `admin.$cmd`).
struct OpQuery<'a> {
    /// flags, fullCollectionName, numberToSkip, numberToReturn: copied as they are.
    prefix: &'a [u8],
    collection: &'a str,
    query: &'a [u8],
    /// The optional returnFieldsSelector.
    rest: &'a [u8],
}

impl<'a> OpQuery<'a> {
    fn parse(msg: &'a [u8]) -> Result<OpQuery<'a>> {
        let name_start = HEADER_LEN + 4;
        let nul = msg.get(name_start..).and_then(|b| b.iter().position(|c| *c == 0)).context("OP_QUERY without a collection name")?;
        let collection = std::str::from_utf8(&msg[name_start..name_start + nul])?;
        let query_start = name_start + nul + 1 + 8;
        let query_len = i32_at(msg, query_start).and_then(|l| usize::try_from(l).ok()).context("OP_QUERY without a query")?;
        let query_end = query_start.checked_add(query_len).filter(|e| *e <= msg.len()).context("OP_QUERY query overruns the message")?;
        Ok(OpQuery { prefix: &msg[HEADER_LEN..query_start], collection, query: &msg[query_start..query_end], rest: &msg[query_end..] })
    }

    fn encode_with_query(&self, head: Header, query: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.prefix.len() + query.len() + self.rest.len());
        Header::write(&mut out, head.request_id, head.response_to, OP_QUERY);
        out.extend_from_slice(self.prefix);
        out.extend_from_slice(query);
        out.extend_from_slice(self.rest);
        finish(out)
    }
}

/// The backend's hello reply with `speculativeAuthenticate: {conversationId, done, payload}`
/// added, or `None` when the hello failed (the driver then reports that error anyway).
fn with_speculative_acceptance(msg: &[u8]) -> Result<Option<Vec<u8>>> {
    let head = Header::of(msg).context("short reply")?;
    let acceptance = doc! {"conversationId": 1, "done": true, "payload": empty_payload()};
    match head.op_code {
        OP_MSG => {
            let op = OpMsg::parse(msg)?;
            let mut body = Document::from_reader(op.body)?;
            if !is_ok(&body) {
                return Ok(None);
            }
            body.insert("speculativeAuthenticate", acceptance);
            Ok(Some(op.encode_with_body(head, &to_bytes(&body)?)))
        }
        OP_REPLY => {
            const DOCS_AT: usize = HEADER_LEN + 20;
            let len = i32_at(msg, DOCS_AT).and_then(|l| usize::try_from(l).ok()).context("OP_REPLY without a document")?;
            let end = DOCS_AT.checked_add(len).filter(|e| *e <= msg.len()).context("OP_REPLY document overruns")?;
            let mut body = Document::from_reader(&msg[DOCS_AT..end])?;
            if !is_ok(&body) {
                return Ok(None);
            }
            body.insert("speculativeAuthenticate", acceptance);
            let mut out = msg[..DOCS_AT].to_vec();
            body.to_writer(&mut out)?;
            out.extend_from_slice(&msg[end..]);
            Ok(Some(finish(out)))
        }
        other => bail!("a hello reply with opCode {other}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::time::{Instant, UNIX_EPOCH};

    use anyhow::anyhow;
    use futures::{FutureExt, StreamExt, TryStreamExt};
    use mongodb::Client;
    use mongodb::error::ErrorKind;
    use mongodb::options::oidc::{Callback, IdpServerResponse};
    use mongodb::options::{AuthMechanism, ClientOptions, Credential};

    use super::*;
    use crate::pki::LabCa;
    use crate::{RunDir, SecantusOptions, SecantusServer};

    /// Lab tokens, no crypto: `ok:<principal>:<unix-expiry-secs>` is valid until that second.
    fn lab_verifier() -> TokenVerifier {
        Arc::new(|token: &str| {
            let parts: Vec<&str> = token.split(':').collect();
            let ["ok", principal, expiry] = parts.as_slice() else { return Err("not a lab token".into()) };
            let expiry: u64 = expiry.parse().map_err(|_| "bad expiry".to_string())?;
            let expires_at = UNIX_EPOCH + Duration::from_secs(expiry);
            if SystemTime::now() >= expires_at {
                return Err("token expired".into());
            }
            Ok(TokenGrant { principal: principal.to_string(), expires_at })
        })
    }

    fn lab_token(principal: &str, valid_for: Duration) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        format!("ok:{principal}:{}", (now + valid_for).as_secs())
    }

    /// A machine callback that mints a token per call and counts the calls.
    fn callback(calls: Arc<AtomicU32>, mint: impl Fn() -> String + Send + Sync + 'static) -> Callback {
        Callback::machine(move |_ctx| {
            calls.fetch_add(1, Ordering::SeqCst);
            let token = mint();
            async move { Ok(IdpServerResponse::builder().access_token(token).build()) }.boxed()
        })
    }

    struct Lab {
        gateway: OidcGateway,
        server: SecantusServer,
        ca: LabCa,
        _dir: RunDir,
    }

    impl Lab {
        async fn start() -> Result<Lab> {
            let server = SecantusServer::start(SecantusOptions::default()).await?;
            let dir = RunDir::new("gateway")?;
            let ca = LabCa::create(dir.path())?;
            let cert = ca.issue_server("gateway", &[])?;
            let gateway = OidcGateway::start(server.port(), &cert, lab_verifier()).await?;
            Ok(Lab { gateway, server, ca, _dir: dir })
        }

        fn uri(&self) -> String {
            format!("mongodb://127.0.0.1:{}/?directConnection=true&tls=true&tlsCAFile={}", self.gateway.port(), self.ca.ca_file().display())
        }

        async fn oidc_options(&self, callback: Callback) -> Result<ClientOptions> {
            let mut options = ClientOptions::parse(format!("{}&authMechanism=MONGODB-OIDC", self.uri())).await?;
            options.credential = Some(Credential::builder().mechanism(AuthMechanism::MongoDbOidc).oidc_callback(callback).build());
            options.server_selection_timeout = Some(Duration::from_secs(10));
            Ok(options)
        }
    }

    fn command_code(err: &mongodb::error::Error) -> Option<i32> {
        match err.kind.as_ref() {
            ErrorKind::Command(command) => Some(command.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn gateway_logs_in_and_forwards_crud_and_change_streams() -> Result<()> {
        let lab = Lab::start().await?;
        let calls = Arc::new(AtomicU32::new(0));
        let options = lab.oidc_options(callback(calls.clone(), || lab_token("alice", Duration::from_secs(3600)))).await?;
        let client = Client::with_options(options)?;
        let coll = client.database("lab").collection::<Document>("login");
        let mut stream = coll.watch().await?;
        coll.insert_many([doc! {"_id": 1, "x": "a"}, doc! {"_id": 2, "x": "b"}]).await?;
        let found: Vec<Document> = coll.find(doc! {}).sort(doc! {"_id": 1}).await?.try_collect().await?;
        assert_eq!(found.iter().filter_map(|d| d.get_str("x").ok()).collect::<Vec<_>>(), ["a", "b"]);
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .context("no change event within 10 s")?
            .context("change stream ended")??;
        assert_eq!(event.document_key, Some(doc! {"_id": 1}));
        let stats = lab.gateway.stats();
        println!("{stats:?}");
        assert!(stats.sasl_start_accepted + stats.speculative_accepted >= 1, "{stats:?}");
        assert_eq!(stats.sasl_start_refused, 0, "{stats:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        Ok(())
    }

    #[tokio::test]
    async fn gateway_refuses_commands_without_login() -> Result<()> {
        let lab = Lab::start().await?;
        let mut options = ClientOptions::parse(lab.uri()).await?;
        options.server_selection_timeout = Some(Duration::from_secs(10));
        let client = Client::with_options(options)?;
        // The handshake and ping are open; data is not.
        client.database("admin").run_command(doc! {"ping": 1}).await?;
        let err = client.database("lab").collection::<Document>("c").find_one(doc! {}).await.err().context("find succeeded")?;
        assert_eq!(command_code(&err), Some(13), "{err}");
        assert!(lab.gateway.stats().unauthorized_sent >= 1);
        Ok(())
    }

    #[tokio::test]
    async fn gateway_refuses_a_bad_token_with_18() -> Result<()> {
        let lab = Lab::start().await?;
        let calls = Arc::new(AtomicU32::new(0));
        let options = lab.oidc_options(callback(calls.clone(), || "forged-token".to_string())).await?;
        let client = Client::with_options(options)?;
        let err = client.database("lab").collection::<Document>("c").find_one(doc! {}).await.err().context("find succeeded")?;
        println!("bad token: {err}");
        assert!(matches!(err.kind.as_ref(), ErrorKind::Authentication { .. }), "{err:?}");
        let stats = lab.gateway.stats();
        assert!(stats.sasl_start_refused >= 1, "{stats:?}");
        assert_eq!(stats.sasl_start_accepted + stats.speculative_accepted, 0, "{stats:?}");
        Ok(())
    }

    #[tokio::test]
    async fn gateway_expiry_makes_the_driver_reauthenticate_without_failing() -> Result<()> {
        let lab = Lab::start().await?;
        let calls = Arc::new(AtomicU32::new(0));
        let options = lab.oidc_options(callback(calls.clone(), || lab_token("p", Duration::from_secs(2)))).await?;
        let client = Client::with_options(options)?;
        let coll = client.database("lab").collection::<Document>("expiring");
        let mut stream = coll.watch().max_await_time(Duration::from_millis(200)).await?;
        let (started, mut inserted, mut events) = (Instant::now(), 0i64, 0u32);
        while started.elapsed() < Duration::from_secs(8) {
            coll.insert_one(doc! {"_id": inserted}).await.with_context(|| format!("insert {inserted}"))?;
            inserted += 1;
            let found = coll.find_one(doc! {"_id": inserted - 1}).await.with_context(|| format!("find {inserted}"))?;
            anyhow::ensure!(found.is_some(), "document {} not found", inserted - 1);
            if stream.next_if_any().await.context("change stream getMore")?.is_some() {
                events += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stats = lab.gateway.stats();
        let calls = calls.load(Ordering::SeqCst);
        println!("{inserted} inserted, {events} events, {calls} callback calls, {stats:?}");
        assert!(stats.reauth_required_sent >= 1, "{stats:?}");
        assert!(calls >= 3, "callback called {calls} times");
        assert!(events >= 1);
        let direct = Client::with_uri_str(lab.server.uri()).await?;
        let stored = direct.database("lab").collection::<Document>("expiring").count_documents(doc! {}).await?;
        assert_eq!(stored, inserted as u64);
        Ok(())
    }

    #[tokio::test]
    async fn gateway_accepts_speculative_auth_with_a_cached_token() -> Result<()> {
        let lab = Lab::start().await?;
        let calls = Arc::new(AtomicU32::new(0));
        let options = lab.oidc_options(callback(calls.clone(), || lab_token("bob", Duration::from_secs(3600)))).await?;
        // Clones of the options share the callback and so its token cache.
        let first = Client::with_options(options.clone())?;
        first.database("lab").collection::<Document>("c").insert_one(doc! {"n": 1}).await?;
        let before = lab.gateway.stats();
        assert_eq!(before.speculative_accepted, 0, "{before:?}");
        let second = Client::with_options(options)?;
        let n = second.database("lab").collection::<Document>("c").count_documents(doc! {}).await?;
        assert_eq!(n, 1);
        let after = lab.gateway.stats();
        println!("before {before:?}\nafter {after:?}");
        assert!(after.speculative_accepted > before.speculative_accepted, "{after:?}");
        assert_eq!(after.sasl_start_accepted, before.sasl_start_accepted, "{after:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the cached token was reused");
        Ok(())
    }

    /// A bare TLS connection to the gateway, for what the driver never sends (OP_QUERY).
    async fn raw_connection(lab: &Lab) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for cert in CertificateDer::pem_slice_iter(lab.ca.ca_pem().as_bytes()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(("127.0.0.1", lab.gateway.port())).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
    }

    /// Sends an OP_QUERY command and returns the OP_REPLY's document.
    async fn op_query<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, id: i32, db: &str, command: Document) -> Result<Document> {
        let mut msg = Vec::new();
        Header::write(&mut msg, id, 0, OP_QUERY);
        msg.extend_from_slice(&0i32.to_le_bytes());
        msg.extend_from_slice(format!("{db}.$cmd\0").as_bytes());
        msg.extend_from_slice(&0i32.to_le_bytes());
        msg.extend_from_slice(&(-1i32).to_le_bytes());
        command.to_writer(&mut msg)?;
        stream.write_all(&finish(msg)).await?;
        let reply = read_message(stream).await?.context("connection closed")?;
        let head = Header::of(&reply).context("short reply")?;
        anyhow::ensure!(head.op_code == OP_REPLY && head.response_to == id, "unexpected reply {head:?}");
        Ok(Document::from_reader(&reply[HEADER_LEN + 20..])?)
    }

    #[tokio::test]
    async fn gateway_speaks_legacy_op_query_and_closes_connections_on_drop() -> Result<()> {
        let lab = Lab::start().await?;
        let mut conn = raw_connection(&lab).await?;
        let refused = op_query(&mut conn, 1, "lab", doc! {"count": "c"}).await?;
        assert_eq!(refused.get_i32("code").ok(), Some(13), "{refused}");
        let token = lab_token("carol", Duration::from_secs(3600));
        let payload = Binary { subtype: BinarySubtype::Generic, bytes: to_bytes(&doc! {"jwt": &token})? };
        let speculative = doc! {"saslStart": 1, "mechanism": "MONGODB-OIDC", "payload": payload.clone(), "db": "$external"};
        let hello = op_query(&mut conn, 2, "admin", doc! {"isMaster": 1, "speculativeAuthenticate": speculative}).await?;
        println!("OP_QUERY isMaster through the gateway: {hello}");
        assert!(hello.get_document("speculativeAuthenticate").is_ok_and(|s| s.get_bool("done") == Ok(true)), "{hello}");
        assert_eq!(lab.gateway.stats().speculative_accepted, 1);
        let counted = op_query(&mut conn, 20, "lab", doc! {"count": "c"}).await?;
        // Logged in, so the command reached the backend (SecantusDB still serves OP_QUERY commands).
        assert_eq!(counted.get_i32("n").ok(), Some(0), "{counted}");
        let login = doc! {"saslStart": 1, "mechanism": "MONGODB-OIDC", "payload": payload};
        let done = op_query(&mut conn, 3, "$external", login).await?;
        assert_eq!(done.get_bool("done").ok(), Some(true), "{done}");
        let wrong_db = doc! {"saslStart": 1, "mechanism": "MONGODB-OIDC", "payload": empty_payload()};
        assert_eq!(op_query(&mut conn, 4, "admin", wrong_db).await?.get_i32("code").ok(), Some(18));
        drop(lab.gateway);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut byte)).await.context("still open")?;
        assert!(matches!(read, Ok(0) | Err(_)), "connection still open after drop: {read:?}");
        Ok(())
    }

    #[test]
    fn gateway_op_msg_round_trip_keeps_sequences_and_drops_checksums() -> Result<()> {
        let body = to_bytes(&doc! {"insert": "c", "$db": "lab"})?;
        let docs = to_bytes(&doc! {"_id": 1})?;
        let mut sequence = vec![1u8];
        sequence.extend_from_slice(&i32::try_from(4 + 10 + docs.len())?.to_le_bytes());
        sequence.extend_from_slice(b"documents\0");
        sequence.extend_from_slice(&docs);
        let mut msg = encode_op_msg(7, 0, 0, &body, &[&sequence]);
        // Add a (fake) checksum the way a client would.
        msg[16] |= CHECKSUM_PRESENT as u8;
        msg.extend_from_slice(&[1, 2, 3, 4]);
        let len = msg.len() as i32;
        msg[..4].copy_from_slice(&len.to_le_bytes());
        assert_eq!(OpMsg::parse(&msg)?.sequences, [sequence.as_slice()]);
        strip_checksum(&mut msg);
        let op = OpMsg::parse(&msg)?;
        assert_eq!((op.flags, op.body, op.sequences.len()), (0, body.as_slice(), 1));
        assert_eq!(i32_at(&msg, 0), Some(msg.len() as i32));
        let head = Header::of(&msg).ok_or_else(|| anyhow!("no header"))?;
        assert_eq!(op.encode_with_body(head, &body), msg);
        Ok(())
    }
}
