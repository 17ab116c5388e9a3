//! Vault Transit stand-in (not Vault).
//!
//! Vault cannot be installed on the machines this is built on, so the Vault Transit
//! backend is tested against this small in-process HTTP server. It follows the
//! documented request and response shapes of the Transit API for the endpoints the
//! client uses — `GET/POST /v1/<mount>/keys/<name>`, `POST …/keys/<name>/rotate`,
//! `POST …/keys/<name>/config` (`min_decryption_version`), `POST /v1/<mount>/encrypt|
//! decrypt|rewrap/<name>`, the `X-Vault-Token` header, base64 plaintext and context,
//! `vault:vN:…` ciphertexts and `{"errors": [...]}` bodies — with real AEAD and real key
//! versions. It is not Vault's cryptography: keys are XChaCha20-Poly1305 and a derived
//! key is HMAC-SHA256(version key, context), where Vault uses AES-GCM and its own KDF.
//! Nothing outside the tests uses it.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use chacha20poly1305::{
    aead::{Aead, KeyInit},
    XChaCha20Poly1305, XNonce,
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

struct Key {
    versions: Vec<[u8; 32]>,
    derived: bool,
    min_decryption_version: usize,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Key>,
}

/// The running stand-in; stops its thread on drop.
pub struct VaultStandin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Requests answered so far, by path.
    requests: Arc<Mutex<Vec<String>>>,
}

impl VaultStandin {
    /// Starts a stand-in on 127.0.0.1 with a Transit engine at `transit/` that accepts
    /// only `token`.
    pub fn start(token: &str) -> VaultStandin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(Mutex::new(State::default()));
        let token = token.to_owned();
        let thread = {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    if let Some(path) = serve(conn, &state, &token) {
                        requests.lock().expect("requests").push(path);
                    }
                }
            })
        };
        VaultStandin { addr, stop, thread: Some(thread), requests }
    }

    pub fn address(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The paths of the requests served so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for VaultStandin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request, answers it and closes the connection.
fn serve(conn: TcpStream, state: &Mutex<State>, token: &str) -> Option<String> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut len = 0usize;
    let mut given_token = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = value.trim().parse().ok()?,
            "x-vault-token" => given_token = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let (status, answer) = if given_token.as_deref() != Some(token) {
        (403, Some(json!({"errors": ["permission denied"]})))
    } else {
        let mut st = state.lock().expect("stand-in state");
        route(&mut st, &method, &path, &body)
    };
    let text = answer.map(|a| a.to_string()).unwrap_or_default();
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Error",
    };
    let mut conn = conn;
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    conn.write_all(head.as_bytes()).ok()?;
    conn.write_all(text.as_bytes()).ok()?;
    conn.flush().ok()?;
    Some(format!("{method} {path}"))
}

fn error(status: u16, msg: &str) -> (u16, Option<Value>) {
    (status, Some(json!({ "errors": [msg] })))
}

fn data(v: Value) -> (u16, Option<Value>) {
    (
        200,
        Some(
            json!({ "request_id": "stand-in", "lease_id": "", "renewable": false, "data": v, "warnings": null }),
        ),
    )
}

fn key_info(name: &str, k: &Key) -> Value {
    let keys: serde_json::Map<String, Value> =
        (1..=k.versions.len()).map(|v| (v.to_string(), json!(1_700_000_000 + v))).collect();
    json!({
        "name": name, "type": "aes256-gcm96", "derived": k.derived, "keys": keys,
        "latest_version": k.versions.len(), "min_decryption_version": k.min_decryption_version,
        "min_encryption_version": 0, "supports_encryption": true, "supports_decryption": true,
        "supports_derivation": true, "deletion_allowed": false, "exportable": false,
    })
}

fn route(st: &mut State, method: &str, path: &str, body: &Value) -> (u16, Option<Value>) {
    let Some(rest) = path.strip_prefix("/v1/transit/") else {
        return error(404, "no handler for route");
    };
    let segs: Vec<&str> = rest.split('/').collect();
    match (method, segs.as_slice()) {
        ("GET", ["keys", name]) => match st.keys.get(*name) {
            Some(k) => data(key_info(name, k)),
            None => (404, Some(json!({ "errors": [] }))),
        },
        ("POST", ["keys", name]) => {
            if body.get("type").and_then(Value::as_str).is_some_and(|t| t != "aes256-gcm96") {
                return error(400, "the stand-in only implements aes256-gcm96 keys");
            }
            let derived = body.get("derived").and_then(Value::as_bool).unwrap_or(false);
            st.keys.entry((*name).to_owned()).or_insert_with(|| Key {
                versions: vec![fresh_key()],
                derived,
                min_decryption_version: 1,
            });
            (204, None)
        }
        ("POST", ["keys", name, "rotate"]) => match st.keys.get_mut(*name) {
            Some(k) => {
                k.versions.push(fresh_key());
                data(key_info(name, k))
            }
            None => error(400, "encryption key not found"),
        },
        ("POST", ["keys", name, "config"]) => match st.keys.get_mut(*name) {
            Some(k) => {
                if let Some(v) = body.get("min_decryption_version").and_then(Value::as_u64) {
                    let v = usize::try_from(v).unwrap_or(usize::MAX);
                    if v > k.versions.len() {
                        return error(
                            400,
                            "cannot set min decryption version above latest version",
                        );
                    }
                    k.min_decryption_version = v.max(1);
                }
                data(key_info(name, k))
            }
            None => error(400, "encryption key not found"),
        },
        ("POST", ["encrypt", name]) => {
            let Some(k) = st.keys.get(*name) else { return error(400, "encryption key not found") };
            let Some(plain) =
                body.get("plaintext").and_then(Value::as_str).and_then(|p| STANDARD.decode(p).ok())
            else {
                return error(400, "missing plaintext to encrypt");
            };
            match encrypt(k, &plain, body) {
                Ok((ct, v)) => data(json!({ "ciphertext": ct, "key_version": v })),
                Err(e) => e,
            }
        }
        ("POST", ["decrypt", name]) => {
            let Some(k) = st.keys.get(*name) else { return error(400, "encryption key not found") };
            match decrypt(k, body) {
                Ok(plain) => data(json!({ "plaintext": STANDARD.encode(plain) })),
                Err(e) => e,
            }
        }
        ("POST", ["rewrap", name]) => {
            let Some(k) = st.keys.get(*name) else { return error(400, "encryption key not found") };
            match decrypt(k, body).and_then(|plain| encrypt(k, &plain, body)) {
                Ok((ct, v)) => data(json!({ "ciphertext": ct, "key_version": v })),
                Err(e) => e,
            }
        }
        _ => error(405, "unsupported operation"),
    }
}

fn fresh_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("random key");
    k
}

type Reply = (u16, Option<Value>);

fn cipher(k: &Key, version: usize, body: &Value) -> Result<XChaCha20Poly1305, Reply> {
    let base = &k.versions[version - 1];
    if !k.derived {
        return Ok(XChaCha20Poly1305::new(base.into()));
    }
    let Some(ctx) =
        body.get("context").and_then(Value::as_str).and_then(|c| STANDARD.decode(c).ok())
    else {
        return Err(error(
            400,
            "missing 'context' for key derivation; the key was created using a derived key, \
             which means additional, per-request information must be included in order to \
             perform operations with the key",
        ));
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(base).expect("hmac key");
    mac.update(&ctx);
    let derived: [u8; 32] = mac.finalize().into_bytes().into();
    Ok(XChaCha20Poly1305::new(&derived.into()))
}

fn encrypt(k: &Key, plain: &[u8], body: &Value) -> Result<(String, usize), Reply> {
    let v = k.versions.len();
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).expect("random nonce");
    let ct = cipher(k, v, body)?
        .encrypt(XNonce::from_slice(&nonce), plain)
        .map_err(|_| error(500, "encrypt"))?;
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&ct);
    Ok((format!("vault:v{v}:{}", STANDARD.encode(blob)), v))
}

fn decrypt(k: &Key, body: &Value) -> Result<Vec<u8>, Reply> {
    let Some(ct) = body.get("ciphertext").and_then(Value::as_str) else {
        return Err(error(400, "missing ciphertext to decrypt"));
    };
    let parsed = ct
        .strip_prefix("vault:v")
        .and_then(|r| r.split_once(':'))
        .and_then(|(v, b)| Some((v.parse::<usize>().ok()?, STANDARD.decode(b).ok()?)));
    let Some((v, blob)) = parsed else { return Err(error(400, "invalid ciphertext: no prefix")) };
    if v == 0 || v > k.versions.len() {
        return Err(error(400, "invalid key version"));
    }
    if v < k.min_decryption_version {
        return Err(error(
            400,
            "ciphertext or signature version is disallowed by policy (too old)",
        ));
    }
    if blob.len() < 24 {
        return Err(error(400, "invalid ciphertext: too short"));
    }
    let (nonce, sealed) = blob.split_at(24);
    cipher(k, v, body)?
        .decrypt(XNonce::from_slice(nonce), sealed)
        .map_err(|_| error(400, "cipher: message authentication failed"))
}
