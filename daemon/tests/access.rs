//! Access control over HTTP against the real binary: token files with names, scopes and key
//! prefixes; 403 on every data path; session tokens from the metadata exchange; SIGHUP
//! reloads that remove tokens at once (also on open connections and watch streams); metrics
//! by token name; tokens never in the log or the metrics.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use denokv::kv::key::{encode, prefix_range, KeyPart};
use denokv::proto as pb;
use http_body_util::BodyExt;
use nix::sys::signal::Signal;
use prost::Message;

const ADMIN: &str = "admin-token-0123456";
const READER: &str = "reader-token-0123456";
const USERS: &str = "users-token-0123456";
const BARE: &str = "bare-token-0123456789";

fn token_file(dir: &Path, text: &str) -> String {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn standard_file() -> String {
    format!(
        "# name scope token [prefix…]\n\
         admin read-write {ADMIN}\n\
         reader read {READER}\n\
         users read-write {USERS} [\"users\"] [\"shared\", 1n]\n\
         {BARE}\n"
    )
}

fn start_with_file(dir: &Path, text: &str, extra: &[&str]) -> Server {
    let file = token_file(dir, text);
    let mut args = vec![
        "--access-token-file",
        file.as_str(),
        "--addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Launch::bare(&dir.join("db.sqlite")).args(&args).start()
}

fn k(parts: &[KeyPart]) -> Bytes {
    Bytes::from(encode(parts))
}

fn s(v: &str) -> KeyPart {
    KeyPart::String(v.into())
}

async fn call(
    c: &Client,
    p: Proto,
    srv: &Server,
    token: &str,
    route: &str,
    body: Vec<u8>,
) -> Reply {
    let auth = format!("Bearer {token}");
    c.request(
        p,
        "POST",
        &srv.url(&format!("/v2/{route}")),
        &[
            ("authorization", auth.as_str()),
            ("x-denokv-version", "3"),
            ("x-denokv-database-id", NIL_ID),
        ],
        body,
    )
    .await
}

fn read_body(ranges: Vec<(Bytes, Bytes)>) -> Vec<u8> {
    pb::SnapshotRead {
        ranges: ranges
            .into_iter()
            .map(|(start, end)| pb::ReadRange {
                start,
                end,
                limit: 100,
                reverse: false,
            })
            .collect(),
    }
    .encode_to_vec()
}

fn get_body(key: &Bytes) -> Vec<u8> {
    let mut end = key.to_vec();
    end.push(0);
    read_body(vec![(key.clone(), Bytes::from(end))])
}

fn list_body(prefix: &[KeyPart]) -> Vec<u8> {
    let (start, end) = prefix_range(&encode(prefix));
    read_body(vec![(Bytes::from(start), Bytes::from(end))])
}

fn set_body(keys: &[&Bytes]) -> Vec<u8> {
    pb::AtomicWrite {
        mutations: keys.iter().map(|k| set_bytes(k, b"v")).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn watch_body(keys: &[&Bytes]) -> Vec<u8> {
    pb::Watch {
        keys: keys
            .iter()
            .map(|k| pb::WatchKey { key: (*k).clone() })
            .collect(),
    }
    .encode_to_vec()
}

async fn exists(c: &Client, srv: &Server, key: &Bytes) -> bool {
    let out: pb::SnapshotReadOutput =
        call(c, Proto::H2, srv, ADMIN, "snapshot_read", get_body(key))
            .await
            .decode();
    !out.ranges[0].values.is_empty()
}

async fn metadata(c: &Client, p: Proto, srv: &Server, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    c.request(
        p,
        "POST",
        &srv.url("/"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        r#"{"supportedVersions":[1,2,3]}"#,
    )
    .await
}

async fn session_of(c: &Client, srv: &Server, token: &str) -> (String, String) {
    let r = metadata(c, Proto::H2, srv, token).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    (
        json["token"].as_str().unwrap().to_string(),
        json["expiresAt"].as_str().unwrap().to_string(),
    )
}

fn assert_forbidden(r: &Reply, text: &str) {
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.content_type(), "text/plain; charset=utf-8");
    assert!(r.text().contains(text), "{}", r.text());
}

const READ_ONLY_TEXT: &str =
    "Access denied: the access token 'reader' may only read (scope read); this write was refused and nothing was written.";
const PREFIX_TEXT: &str =
    "Access denied: a key or range of this request lies outside the key prefixes of the access token 'users'; nothing was read or written.";

fn no_token_in(text: &str, what: &str) {
    for t in [ADMIN, READER, USERS, BARE] {
        assert!(!text.contains(t), "{what} holds a token:\n{text}");
    }
}

#[tokio::test]
async fn a_read_token_reads_and_its_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with_file(dir.path(), &standard_file(), &[]);
    let c = Client::new();
    let key = k(&[s("doc")]);
    for p in BOTH {
        let r = call(&c, p, &srv, READER, "snapshot_read", list_body(&[])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = call(&c, p, &srv, READER, "atomic_write", set_body(&[&key])).await;
        assert_eq!(r.text(), READ_ONLY_TEXT);
        assert_forbidden(&r, READ_ONLY_TEXT);
        // A check-only write is still an atomic write.
        let checks = pb::AtomicWrite {
            checks: vec![pb::Check {
                key: key.clone(),
                versionstamp: Bytes::new(),
            }],
            ..Default::default()
        };
        let r = call(&c, p, &srv, READER, "atomic_write", checks.encode_to_vec()).await;
        assert_forbidden(&r, READ_ONLY_TEXT);
        // Watching is reading.
        let r = c
            .send(p, {
                let mut req = data_request(&srv.url("/v2/watch"), watch_body(&[&key]));
                req.headers_mut()
                    .insert("authorization", format!("Bearer {READER}").parse().unwrap());
                req
            })
            .await;
        assert_eq!(r.status(), 200);
        drop(r);
        // The metadata exchange works for it.
        assert_eq!(metadata(&c, p, &srv, READER).await.status, 200);
    }
    assert!(!exists(&c, &srv, &key).await, "nothing was written");
    // The bare line and the admin token write anywhere.
    for t in [ADMIN, BARE] {
        let r = call(&c, Proto::H2, &srv, t, "atomic_write", set_body(&[&key])).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let (_, _, metrics) = srv.scrape();
    for line in [
        "denokv_token_refusals_total{reason=\"read_only\",token=\"reader\"} 4",
        "denokv_token_requests_total{token=\"reader\"} 10",
        "denokv_token_requests_total{token=\"line-5\"} 1",
        "denokv_http_requests_total{route=\"atomic_write\",status=\"403\"} 4",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    no_token_in(&metrics, "the metrics");
    no_token_in(&srv.log_text(), "the log");
}

#[tokio::test]
async fn a_prefix_token_stays_inside_its_prefixes_on_every_path() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with_file(dir.path(), &standard_file(), &[]);
    let c = Client::new();
    let inside = k(&[s("users"), KeyPart::Int(1)]);
    let shared = k(&[s("shared"), KeyPart::Int(1), s("x")]);
    let outside = k(&[s("other")]);
    // Bytewise it starts with ["users"], but it is the one-part key ["users\0x"].
    let trap = k(&[s("users\0x")]);
    let wider = k(&[s("shared")]);
    for p in BOTH {
        // Writes inside both prefixes, and the prefix key itself.
        let users_key = k(&[s("users")]);
        let r = call(
            &c,
            p,
            &srv,
            USERS,
            "atomic_write",
            set_body(&[&inside, &shared, &users_key]),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // Reads: get, list of the prefix and of a deeper one, several ranges at once.
        for body in [
            get_body(&inside),
            list_body(&[s("users")]),
            list_body(&[s("users"), KeyPart::Int(1)]),
            list_body(&[s("shared"), KeyPart::Int(1)]),
        ] {
            let r = call(&c, p, &srv, USERS, "snapshot_read", body).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let listed: pb::SnapshotReadOutput = call(
            &c,
            p,
            &srv,
            USERS,
            "snapshot_read",
            list_body(&[s("users")]),
        )
        .await
        .decode();
        let users = encode(&[s("users")]);
        assert!(!listed.ranges[0].values.is_empty());
        assert!(listed.ranges[0]
            .values
            .iter()
            .all(|e| denokv::kv::key::in_prefix(&users, &e.key)));
        // Outside: every one refused, with no partial result and nothing written.
        let (ls, le) = prefix_range(&encode(&[s("users")]));
        let refused_reads = [
            get_body(&outside),
            get_body(&trap),
            list_body(&[]),
            list_body(&[s("shared")]),
            list_body(&[s("user")]),
            // One range inside, one outside: the whole read is refused.
            read_body(vec![
                (Bytes::from(ls.clone()), Bytes::from(le.clone())),
                (Bytes::from(vec![0]), Bytes::from(vec![0xff])),
            ]),
            // Starts inside, ends past the prefix.
            read_body(vec![(Bytes::from(ls.clone()), Bytes::from(vec![0xff]))]),
        ];
        for body in refused_reads {
            let r = call(&c, p, &srv, USERS, "snapshot_read", body).await;
            assert_forbidden(&r, PREFIX_TEXT);
        }
        let mixed = set_body(&[&inside, &outside]);
        let check_outside = pb::AtomicWrite {
            checks: vec![pb::Check {
                key: outside.clone(),
                versionstamp: Bytes::new(),
            }],
            mutations: vec![set_bytes(&inside, b"w")],
            ..Default::default()
        };
        let dead_letter_outside = pb::AtomicWrite {
            enqueues: vec![pb::Enqueue {
                payload: Bytes::from_static(b"\xff\x0f\x49\x02"),
                deadline_ms: 0,
                keys_if_undelivered: vec![inside.clone(), outside.clone()],
                backoff_schedule: vec![],
            }],
            ..Default::default()
        };
        let versionstamped_outside = pb::AtomicWrite {
            mutations: vec![pb::Mutation {
                mutation_type: pb::MutationType::MSetSuffixVersionstampedKey as i32,
                ..set_bytes(&wider, b"v")
            }],
            ..Default::default()
        };
        for body in [
            set_body(&[&outside]),
            set_body(&[&trap]),
            mixed,
            check_outside.encode_to_vec(),
            dead_letter_outside.encode_to_vec(),
            versionstamped_outside.encode_to_vec(),
        ] {
            let r = call(&c, p, &srv, USERS, "atomic_write", body).await;
            assert_forbidden(&r, PREFIX_TEXT);
        }
        let r = call(
            &c,
            p,
            &srv,
            USERS,
            "watch",
            watch_body(&[&inside, &outside]),
        )
        .await;
        assert_forbidden(&r, PREFIX_TEXT);
        // Inside: an enqueue with dead-letter keys inside, a versionstamped key, a watch.
        let dead_letter_inside = pb::AtomicWrite {
            enqueues: vec![pb::Enqueue {
                payload: Bytes::from_static(b"\xff\x0f\x49\x02"),
                deadline_ms: 0,
                keys_if_undelivered: vec![inside.clone()],
                backoff_schedule: vec![],
            }],
            mutations: vec![pb::Mutation {
                mutation_type: pb::MutationType::MSetSuffixVersionstampedKey as i32,
                ..set_bytes(&k(&[s("users"), s("log")]), b"v")
            }],
            ..Default::default()
        };
        let r = call(
            &c,
            p,
            &srv,
            USERS,
            "atomic_write",
            dead_letter_inside.encode_to_vec(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let resp = c
            .send(p, {
                let mut req = data_request(&srv.url("/v2/watch"), watch_body(&[&inside, &shared]));
                req.headers_mut()
                    .insert("authorization", format!("Bearer {USERS}").parse().unwrap());
                req
            })
            .await;
        assert_eq!(resp.status(), 200);
    }
    for key in [&outside, &trap] {
        assert!(!exists(&c, &srv, key).await, "nothing was written outside");
    }
    let (_, _, metrics) = srv.scrape();
    let refusals = "denokv_token_refusals_total{reason=\"prefix\",token=\"users\"} 28";
    assert!(
        metrics.lines().any(|l| l == refusals),
        "no {refusals:?} in\n{metrics}"
    );
    no_token_in(&metrics, "the metrics");
    no_token_in(&srv.log_text(), "the log");
}

#[tokio::test]
async fn session_tokens_carry_the_scope_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with_file(dir.path(), &standard_file(), &["--session-token-ttl", "2"]);
    let c = Client::new();
    let inside = k(&[s("users"), KeyPart::Int(1)]);
    let outside = k(&[s("other")]);
    let (session, expires) = session_of(&c, &srv, USERS).await;
    assert!(session.starts_with("denokv-session."), "{session}");
    no_token_in(&session, "the session token");
    // expiresAt is the session's expiry: 2 s from now.
    let secs_left = chrono_like_parse(&expires)
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!((0.5..=2.5).contains(&secs_left), "{expires}: {secs_left}");
    for p in BOTH {
        let r = call(&c, p, &srv, &session, "atomic_write", set_body(&[&inside])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = call(&c, p, &srv, &session, "atomic_write", set_body(&[&outside])).await;
        assert_forbidden(&r, PREFIX_TEXT);
    }
    let (read_session, _) = session_of(&c, &srv, READER).await;
    let r = call(
        &c,
        Proto::H2,
        &srv,
        &read_session,
        "atomic_write",
        set_body(&[&inside]),
    )
    .await;
    assert_forbidden(&r, READ_ONLY_TEXT);
    // A session token does not buy another session.
    let r = metadata(&c, Proto::H2, &srv, &session).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (401, "Invalid access token.")
    );
    // After expiry: 401 (a 4xx: Deno refreshes its metadata and retries once).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for p in BOTH {
        let r = call(&c, p, &srv, &session, "snapshot_read", get_body(&inside)).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (401, "Invalid access token.")
        );
        // The long-lived token is still accepted on the data path.
        let r = call(&c, p, &srv, USERS, "snapshot_read", get_body(&inside)).await;
        assert_eq!(r.status, 200);
    }
    // A session made by another server process with the same token is accepted: session
    // tokens are keyed by their parent token, not by the process, so they outlive a restart.
    let other_dir = tempfile::tempdir().unwrap();
    let other = start_with_file(other_dir.path(), &standard_file(), &[]);
    let (foreign, _) = session_of(&c, &other, USERS).await;
    let r = call(
        &c,
        Proto::H2,
        &srv,
        &foreign,
        "snapshot_read",
        get_body(&inside),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // One whose tag does not match its parent's key is refused.
    let mut forged = foreign.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let r = call(
        &c,
        Proto::H2,
        &srv,
        &forged,
        "snapshot_read",
        get_body(&inside),
    )
    .await;
    assert_eq!(r.status, 401);
    no_token_in(&srv.log_text(), "the log");
}

/// Counts the data frames (not pings) of a watch body.
struct DataFrames {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    seen: usize,
}

impl DataFrames {
    fn new(body: hyper::body::Incoming) -> Self {
        DataFrames {
            body,
            buf: Vec::new(),
            seen: 0,
        }
    }

    /// Reads until `n` data frames were seen in all; panics after `limit` or at the end.
    async fn until(&mut self, n: usize, limit: Duration) {
        tokio::time::timeout(limit, async {
            while self.seen < n {
                let frame = self.body.frame().await.expect("the stream ended").unwrap();
                if let Ok(d) = frame.into_data() {
                    self.buf.extend_from_slice(&d);
                }
                while self.buf.len() >= 4 {
                    let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                    if self.buf.len() < 4 + len {
                        break;
                    }
                    self.buf.drain(..4 + len);
                    self.seen += usize::from(len > 0);
                }
            }
        })
        .await
        .expect("no data frame in time");
    }
}

#[tokio::test]
async fn session_tokens_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with_file(dir.path(), &standard_file(), &["--session-token-ttl", "0"]);
    let c = Client::new();
    let r = metadata(&c, Proto::H2, &srv, USERS).await;
    let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(json["token"], USERS, "the presented token itself");
    let secs_left = chrono_like_parse(json["expiresAt"].as_str().unwrap())
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    assert!((86_300.0..=86_400.0).contains(&secs_left), "{secs_left}");
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` to seconds since 1970.
fn chrono_like_parse(s: &str) -> f64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60) as f64 + s[17..23].parse::<f64>().unwrap()
}

#[tokio::test]
async fn a_reload_removes_a_token_at_once_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with_file(dir.path(), &standard_file(), &[]);
    let c = Client::new();
    let inside = k(&[s("users"), KeyPart::Int(1)]);
    let (session, _) = session_of(&c, &srv, USERS).await;
    // One h2 connection carries all of these (the client pools it).
    for t in [USERS, session.as_str(), ADMIN] {
        let r = call(&c, Proto::H2, &srv, t, "snapshot_read", get_body(&inside)).await;
        assert_eq!(r.status, 200);
    }
    let watch = |token: &str| {
        let mut req = data_request(&srv.url("/v2/watch"), watch_body(&[&inside]));
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let mut users_watch = c.send(Proto::H2, watch(&session)).await.into_body();
    let mut admin_watch = DataFrames::new(c.send(Proto::H2, watch(ADMIN)).await.into_body());
    admin_watch.until(1, Duration::from_secs(5)).await;
    // Drop the users line (and narrow nothing else).
    std::fs::write(
        dir.path().join("tokens"),
        format!("admin read-write {ADMIN}\nreader read {READER}\n"),
    )
    .unwrap();
    srv.signal(Signal::SIGHUP);
    srv.wait_for_log("reloaded on SIGHUP", Duration::from_secs(10));
    for t in [USERS, session.as_str()] {
        let r = call(&c, Proto::H2, &srv, t, "snapshot_read", get_body(&inside)).await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (401, "Invalid access token.")
        );
        assert_eq!(metadata(&c, Proto::H2, &srv, t).await.status, 401);
    }
    // The users watch stream ends (well before its 5 s ping); the admin one goes on.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(f) = users_watch.frame().await {
            if f.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the removed token's watch stream is still open"
    );
    let r = call(
        &c,
        Proto::H2,
        &srv,
        ADMIN,
        "atomic_write",
        set_body(&[&inside]),
    )
    .await;
    assert_eq!(r.status, 200);
    // The admin stream goes on: it sends the change.
    admin_watch.until(2, Duration::from_secs(5)).await;
    // Its metric series went with it.
    let (_, _, metrics) = srv.scrape();
    assert!(!metrics.contains("token=\"users\""), "{metrics}");
    assert!(metrics.contains("denokv_token_requests_total{token=\"admin\"}"));
    // The connection was never dropped: the server holds the same one connection.
    let open = metrics
        .lines()
        .find_map(|l| l.strip_prefix("denokv_open_connections "))
        .unwrap();
    assert_eq!(open, "1", "{metrics}");
    no_token_in(&srv.log_text(), "the log");
}

#[test]
fn a_token_on_the_command_line_is_warned_about_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let warning = "the access token was given on the command line (--access-token)";
    let on_line = Launch::new(&db).start();
    let log = on_line.wait_for_log(warning, Duration::from_secs(10));
    assert!(log.contains("WARN"), "{log}");
    assert!(!on_line.log_text().contains(TOKEN));
    drop(on_line);
    let from_env = Launch::bare(&db)
        .args(&["--addr", "127.0.0.1:0"])
        .env("DENO_KV_ACCESS_TOKEN", TOKEN)
        .start();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !from_env.log_text().contains(warning),
        "{}",
        from_env.log_text()
    );
    drop(from_env);
    let file = token_file(dir.path(), &standard_file());
    let from_file = Launch::bare(&db)
        .args(&["--access-token-file", &file, "--addr", "127.0.0.1:0"])
        .start();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!from_file.log_text().contains(warning));
}

#[test]
fn a_malformed_token_file_is_refused_naming_the_line_never_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(
        dir.path(),
        &format!("admin read-write {ADMIN}\nusers readwrite {USERS} [\"users\"]\n"),
    );
    let db = dir.path().join("db.sqlite").display().to_string();
    let (status, stderr) = run_binary(
        &["--sqlite-path", &db, "serve", "--access-token-file", &file],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "Error: {file}, line 2: the scope (second field) must be read or read-write"
        )),
        "{stderr}"
    );
    no_token_in(&stderr, "the error");
}
