//! The HTTP surface (SPEC §1, §2): every route and error case, over HTTP/1.1 and h2c, against
//! the real binary.

mod common;

use bytes::Bytes;
use common::*;
use denokv::proto as pb;
use prost::Message;

/// Request headers, and the status and text they must get.
type Headers<'a> = Vec<(&'a str, &'a str)>;

fn auth() -> String {
    format!("Bearer {TOKEN}")
}

fn get_range(k: &Bytes) -> pb::ReadRange {
    let mut end = k.to_vec();
    end.push(0);
    pb::ReadRange {
        start: k.clone(),
        end: Bytes::from(end),
        limit: 1,
        reverse: false,
    }
}

fn set(k: &Bytes, data: &[u8], encoding: pb::ValueEncoding) -> pb::Mutation {
    pb::Mutation {
        key: k.clone(),
        value: Some(pb::KvValue {
            data: Bytes::copy_from_slice(data),
            encoding: encoding as i32,
        }),
        mutation_type: pb::MutationType::MSet as i32,
        ..Default::default()
    }
}

fn le64_op(k: &Bytes, ty: pb::MutationType, n: u64) -> pb::Mutation {
    pb::Mutation {
        mutation_type: ty as i32,
        ..set(k, &n.to_le_bytes(), pb::ValueEncoding::VeLe64)
    }
}

fn write(mutations: Vec<pb::Mutation>) -> pb::AtomicWrite {
    pb::AtomicWrite {
        mutations,
        ..Default::default()
    }
}

async fn commit(c: &Client, p: Proto, s: &Server, w: pb::AtomicWrite) -> pb::AtomicWriteOutput {
    c.data(p, s, "atomic_write", w.encode_to_vec())
        .await
        .decode()
}

async fn get(c: &Client, p: Proto, s: &Server, k: &Bytes) -> Option<pb::KvEntry> {
    let out: pb::SnapshotReadOutput = c
        .data(
            p,
            s,
            "snapshot_read",
            pb::SnapshotRead {
                ranges: vec![get_range(k)],
            }
            .encode_to_vec(),
        )
        .await
        .decode();
    out.ranges[0].values.first().cloned()
}

#[tokio::test]
async fn metadata_exchange() {
    let s = Server::start(&[]);
    let c = Client::new();
    let a = auth();
    for p in BOTH {
        let r = c
            .request(
                p,
                "POST",
                &s.url("/"),
                &[("authorization", &a), ("content-type", "application/json")],
                r#"{"supportedVersions":[1,2,3]}"#,
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type(), "application/json");
        let json: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let obj = json.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            ["databaseId", "endpoints", "expiresAt", "token", "version"],
            "exactly five properties"
        );
        assert_eq!(json["version"], 3);
        assert_eq!(json["databaseId"], NIL_ID);
        assert_eq!(
            json["endpoints"],
            serde_json::json!([{"url": "/v2", "consistency": "strong"}])
        );
        // A session token derived from ours (daemon/tests/access.rs tests it further).
        let session = json["token"].as_str().unwrap();
        assert!(session.starts_with("denokv-session."), "{session}");
        assert!(!session.contains(TOKEN));
        let expires = json["expiresAt"].as_str().unwrap();
        assert!(expires.ends_with('Z') && expires.len() == 24, "{expires}");

        let v2 = c
            .request(
                p,
                "POST",
                &s.url("/"),
                &[("authorization", &a)],
                r#"{"supportedVersions":[2]}"#,
            )
            .await;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&v2.body).unwrap()["version"],
            2
        );
    }
}

#[tokio::test]
async fn metadata_errors_authenticate_first() {
    let s = Server::start(&[]);
    let c = Client::new();
    let a = auth();
    let cases: Vec<(Headers, &str, u16, &str)> = vec![
        (vec![], r#"{"supportedVersions":[3]}"#, 401, "Malformed authorization header."),
        (vec![("authorization", "Bearer")], r#"{"supportedVersions":[3]}"#, 401, "Malformed authorization header."),
        (vec![("authorization", "Bearer nope-nope-nope")], r#"{"supportedVersions":[3]}"#, 401, "Invalid access token."),
        // Unauthenticated callers learn nothing about versions (SPEC §10 D10).
        (vec![("authorization", "Bearer nope-nope-nope")], r#"{"supportedVersions":[1]}"#, 401, "Invalid access token."),
        (vec![("authorization", &a)], "", 400, "The server requires at least protocol version 2. Use Deno 1.38.0 or newer."),
        (vec![("authorization", &a)], "not json", 400, "The server requires at least protocol version 2. Use Deno 1.38.0 or newer."),
        (
            vec![("authorization", &a)],
            r#"{"supportedVersions":[1]}"#,
            400,
            "The server could not negotiate a protocol version. The server requires protocol version 2 or 3.",
        ),
    ];
    for p in BOTH {
        for (headers, body, status, text) in &cases {
            let r = c
                .request(p, "POST", &s.url("/"), headers, body.to_string())
                .await;
            assert_eq!(
                (r.status, r.text().as_str()),
                (*status, *text),
                "{p:?} {headers:?} {body}"
            );
            assert_eq!(r.content_type(), "text/plain; charset=utf-8");
        }
    }
}

#[tokio::test]
async fn routing_errors() {
    let s = Server::start(&[]);
    let c = Client::new();
    for p in BOTH {
        for path in ["/nope", "/v2/snapshot_read/", "/v2", "/db"] {
            let r = c.request(p, "POST", &s.url(path), &[], "").await;
            assert_eq!(
                (r.status, r.text().as_str()),
                (404, "Resource not found."),
                "{path}"
            );
        }
        for path in ["/", "/v2/atomic_write"] {
            let r = c.request(p, "GET", &s.url(path), &[], "").await;
            assert_eq!((r.status, r.body.len()), (405, 0), "{path}");
        }
    }
}

#[tokio::test]
async fn data_path_header_checks_in_order() {
    let s = Server::start(&[]);
    let c = Client::new();
    let a = auth();
    let body = pb::SnapshotRead {
        ranges: vec![get_range(&key("a"))],
    }
    .encode_to_vec();
    let cases: Vec<(Headers, u16, &str)> = vec![
        (
            vec![("authorization", &a), ("x-denokv-database-id", NIL_ID)],
            400,
            "Expected protocol version 2.",
        ),
        (
            vec![
                ("authorization", &a),
                ("x-denokv-version", "4"),
                ("x-denokv-database-id", NIL_ID),
            ],
            400,
            "Expected protocol version 2.",
        ),
        (
            vec![("x-denokv-version", "3"), ("x-denokv-database-id", NIL_ID)],
            401,
            "Malformed authorization header.",
        ),
        (
            vec![
                ("authorization", "Bearer wrong-token!!"),
                ("x-denokv-version", "3"),
            ],
            401,
            "Invalid access token.",
        ),
        (
            vec![("authorization", &a), ("x-denokv-version", "3")],
            400,
            "Invalid database id.",
        ),
        (
            vec![
                ("authorization", &a),
                ("x-denokv-version", "2"),
                (
                    "x-denokv-database-id",
                    "11111111-1111-1111-1111-111111111111",
                ),
            ],
            400,
            "Invalid database id.",
        ),
        (
            vec![
                ("authorization", &a),
                ("x-denokv-version", "2"),
                ("x-denokv-database-id", "not-a-uuid"),
            ],
            400,
            "Invalid database id.",
        ),
    ];
    for p in BOTH {
        for (headers, status, text) in &cases {
            let r = c
                .request(
                    p,
                    "POST",
                    &s.url("/v2/snapshot_read"),
                    headers,
                    body.clone(),
                )
                .await;
            assert_eq!(
                (r.status, r.text().as_str()),
                (*status, *text),
                "{p:?} {headers:?}"
            );
        }
        // Any UUID spelling of the nil id is accepted, and version 2 works like 3.
        for id in [
            NIL_ID,
            "00000000000000000000000000000000",
            "{00000000-0000-0000-0000-000000000000}",
        ] {
            let headers = [
                ("authorization", a.as_str()),
                ("x-denokv-version", "2"),
                ("x-denokv-database-id", id),
            ];
            let r = c
                .request(
                    p,
                    "POST",
                    &s.url("/v2/snapshot_read"),
                    &headers,
                    body.clone(),
                )
                .await;
            assert_eq!(r.status, 200, "{id}: {}", r.text());
        }
    }
}

#[tokio::test]
async fn bad_bodies() {
    let s = Server::start(&[]);
    let c = Client::new();
    for p in BOTH {
        let r = c.data(p, &s, "snapshot_read", vec![0xff, 0xff, 0xff]).await;
        assert_eq!(r.status, 400);
        assert!(
            r.text()
                .starts_with("Request protobuf is invalid: failed to decode Protobuf message"),
            "{}",
            r.text()
        );
        assert!(r.text().ends_with('.'));
        let r = c
            .data(p, &s, "atomic_write", vec![0u8; 2 * 1024 * 1024 + 1])
            .await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (
                413,
                "Failed to buffer the request body: length limit exceeded"
            )
        );
    }
}

#[tokio::test]
async fn spec_exchange_vectors() {
    let s = Server::start(&[]);
    let c = Client::new();
    for p in BOTH {
        // SPEC §11.3: a get of ["a"] on an empty database.
        let r = c
            .data(
                p,
                &s,
                "snapshot_read",
                hex("0a0d0a030261001204026100001801"),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type(), "application/x-protobuf");
        assert_eq!(to_hex(&r.body), "0a0020014001");
    }
    // One set of ["a"] = bytes "x".
    let r = c
        .data(
            Proto::H2,
            &s,
            "atomic_write",
            hex("120e0a0302610012050a017810031801"),
        )
        .await;
    let out: pb::AtomicWriteOutput = r.decode();
    assert_eq!(out.status, pb::AtomicWriteStatus::AwSuccess as i32);
    assert_eq!(out.versionstamp.len(), 10);
    let v = u64::from_be_bytes(out.versionstamp[..8].try_into().unwrap());
    assert!(
        (1..=9).contains(&v),
        "first commit of a fresh database: {v}"
    );
    let r = c
        .data(
            Proto::H1,
            &s,
            "snapshot_read",
            hex("0a0d0a030261001204026100001801"),
        )
        .await;
    let want = format!(
        "0a180a160a030261001201781803220a{}20014001",
        to_hex(&out.versionstamp)
    );
    assert_eq!(to_hex(&r.body), want);
}

#[tokio::test]
async fn reads_ranges_reverse_and_limits() {
    let s = Server::start(&[]);
    let c = Client::new();
    let muts = (0..20)
        .map(|i| set(&key(&format!("k{i:02}")), b"v", pb::ValueEncoding::VeBytes))
        .collect();
    commit(&c, Proto::H2, &s, write(muts)).await;
    let range = |a: &str, b: &str, limit, reverse| pb::ReadRange {
        start: key(a),
        end: key(b),
        limit,
        reverse,
    };
    let read = pb::SnapshotRead {
        ranges: vec![
            range("k03", "k07", 100, false),
            range("k03", "k07", 2, true),
            range("k09", "k01", 5, false),
        ],
    };
    let out: pb::SnapshotReadOutput = c
        .data(Proto::H1, &s, "snapshot_read", read.encode_to_vec())
        .await
        .decode();
    let names = |r: &pb::ReadRangeOutput| -> Vec<String> {
        r.values
            .iter()
            .map(|e| String::from_utf8(e.key[1..e.key.len() - 1].to_vec()).unwrap())
            .collect()
    };
    assert_eq!(names(&out.ranges[0]), ["k03", "k04", "k05", "k06"]);
    assert_eq!(names(&out.ranges[1]), ["k06", "k05"]);
    assert!(
        out.ranges[2].values.is_empty(),
        "start >= end is empty, not an error"
    );
    assert!(out.read_is_strongly_consistent && !out.read_disabled);
    assert_eq!(out.status, pb::SnapshotReadStatus::SrSuccess as i32);

    let too_many = pb::SnapshotRead {
        ranges: vec![range("a", "b", 1, false); 11],
    };
    let r = c
        .data(Proto::H2, &s, "snapshot_read", too_many.encode_to_vec())
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Too many read ranges requested in one read request.")
    );
    let zero = pb::SnapshotRead {
        ranges: vec![range("a", "b", 0, false)],
    };
    let r = c
        .data(Proto::H2, &s, "snapshot_read", zero.encode_to_vec())
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            400,
            "The read range limit of the snapshot read request is invalid."
        )
    );
    let big = pb::SnapshotRead {
        ranges: vec![range("a", "b", 1001, false)],
    };
    let r = c
        .data(Proto::H2, &s, "snapshot_read", big.encode_to_vec())
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.text(), "The total number of entries requested across read ranges in the read request is too large.");
}

#[tokio::test]
async fn writes_checks_and_failed_checks() {
    let s = Server::start(&[]);
    let c = Client::new();
    let (a, b) = (key("a"), key("b"));
    let first = commit(
        &c,
        Proto::H2,
        &s,
        write(vec![set(&a, b"1", pb::ValueEncoding::VeBytes)]),
    )
    .await;
    let stamp = first.versionstamp.clone();
    let w = pb::AtomicWrite {
        checks: vec![
            pb::Check {
                key: a.clone(),
                versionstamp: stamp.clone(),
            },
            pb::Check {
                key: a.clone(),
                versionstamp: Bytes::new(),
            },
            pb::Check {
                key: b.clone(),
                versionstamp: Bytes::new(),
            },
            pb::Check {
                key: b.clone(),
                versionstamp: stamp.clone(),
            },
        ],
        mutations: vec![set(&b, b"2", pb::ValueEncoding::VeBytes)],
        ..Default::default()
    };
    let out = commit(&c, Proto::H1, &s, w).await;
    assert_eq!(out.status, pb::AtomicWriteStatus::AwCheckFailure as i32);
    assert_eq!(out.failed_checks, [1, 3], "every failing check, ascending");
    assert!(out.versionstamp.is_empty());
    assert!(get(&c, Proto::H1, &s, &b).await.is_none());

    let ok = pb::AtomicWrite {
        checks: vec![
            pb::Check {
                key: a.clone(),
                versionstamp: stamp.clone(),
            },
            pb::Check {
                key: b.clone(),
                versionstamp: Bytes::new(),
            },
        ],
        mutations: vec![set(&b, b"2", pb::ValueEncoding::VeBytes)],
        ..Default::default()
    };
    let out = commit(&c, Proto::H2, &s, ok).await;
    assert_eq!(out.status, pb::AtomicWriteStatus::AwSuccess as i32);
    assert!(out.versionstamp > stamp, "versionstamps increase");
    assert_eq!(
        get(&c, Proto::H2, &s, &b).await.unwrap().versionstamp,
        out.versionstamp
    );

    // 100 checks are fine (Deno allows them; SPEC §10 D19), 101 are not.
    let checks = |n| pb::AtomicWrite {
        checks: vec![
            pb::Check {
                key: a.clone(),
                versionstamp: Bytes::new()
            };
            n
        ],
        ..Default::default()
    };
    let out = commit(&c, Proto::H2, &s, checks(100)).await;
    assert_eq!(out.failed_checks.len(), 100);
    let r = c
        .data(Proto::H2, &s, "atomic_write", checks(101).encode_to_vec())
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Too many checks included in atomic write.")
    );
}

#[tokio::test]
async fn invalid_writes_are_400s_and_leave_no_trace() {
    let s = Server::start(&[]);
    let c = Client::new();
    let (n, text, other) = (key("n"), key("text"), key("other"));
    commit(
        &c,
        Proto::H2,
        &s,
        write(vec![set(&text, b"hello", pb::ValueEncoding::VeBytes)]),
    )
    .await;
    let before = commit(&c, Proto::H2, &s, write(vec![])).await.versionstamp;
    let cases: Vec<(pb::Mutation, &str)> = vec![
        (
            le64_op(&text, pb::MutationType::MSum, 1),
            "Failed to perform 'sum' mutation on a non-U64 value in the database",
        ),
        (
            le64_op(&text, pb::MutationType::MMin, 1),
            "Failed to perform 'min' mutation on a non-U64 value in the database",
        ),
        (
            le64_op(&text, pb::MutationType::MMax, 1),
            "Failed to perform 'max' mutation on a non-U64 value in the database",
        ),
        (
            pb::Mutation {
                mutation_type: pb::MutationType::MMax as i32,
                ..set(&n, b"\xff\x0f\x49\x02", pb::ValueEncoding::VeV8)
            },
            "Failed to perform 'max' mutation on a non-U64 operand",
        ),
        (
            set(&n, b"1234", pb::ValueEncoding::VeLe64),
            "A Deno.KvU64 (LE64) value must be exactly 8 bytes.",
        ),
        (
            set(&n, b"x", pb::ValueEncoding::VeUnspecified),
            "The value encoding 0 is unknown.",
        ),
        (
            pb::Mutation {
                mutation_type: 6,
                ..set(&n, b"x", pb::ValueEncoding::VeBytes)
            },
            "Invalid mutation kind or arguments.",
        ),
        (
            pb::Mutation {
                value: None,
                ..set(&n, b"", pb::ValueEncoding::VeBytes)
            },
            "Invalid mutation kind or arguments.",
        ),
        (
            pb::Mutation {
                expire_at_ms: -2,
                ..set(&n, b"x", pb::ValueEncoding::VeBytes)
            },
            "Invalid mutation expire at.",
        ),
        (
            set(
                &Bytes::from(vec![1u8; 2049]),
                b"x",
                pb::ValueEncoding::VeBytes,
            ),
            "A key exceeds the key size limit.",
        ),
        (
            set(&n, &vec![0u8; 65537], pb::ValueEncoding::VeBytes),
            "A value exceeds the value size limit.",
        ),
        (
            pb::Mutation {
                mutation_type: pb::MutationType::MSum as i32,
                ..set(&n, b"x", pb::ValueEncoding::VeBytes)
            },
            "Some of the parameters are not valid V8 values",
        ),
    ];
    for p in BOTH {
        for (bad, text) in &cases {
            // A valid set before the bad mutation must not survive (SPEC §10 D1).
            let w = write(vec![
                set(&other, b"leak", pb::ValueEncoding::VeBytes),
                bad.clone(),
            ]);
            let r = c.data(p, &s, "atomic_write", w.encode_to_vec()).await;
            assert_eq!((r.status, r.text().as_str()), (400, *text), "{p:?}");
            assert!(
                get(&c, p, &s, &other).await.is_none(),
                "{text}: the earlier mutation leaked"
            );
        }
    }
    let after = commit(&c, Proto::H2, &s, write(vec![])).await.versionstamp;
    let gap = u64::from_be_bytes(after[..8].try_into().unwrap())
        - u64::from_be_bytes(before[..8].try_into().unwrap());
    assert!(gap <= 9, "failed writes advanced the version by {gap}");
}

#[tokio::test]
async fn le64_sum_min_max_and_v8_sum() {
    let s = Server::start(&[]);
    let c = Client::new();
    let n = key("n");
    let ops = vec![
        le64_op(&n, pb::MutationType::MSum, 5),
        le64_op(&n, pb::MutationType::MSum, u64::MAX), // wraps: 4
        le64_op(&n, pb::MutationType::MMax, 10),
        le64_op(&n, pb::MutationType::MMin, 7),
    ];
    commit(&c, Proto::H2, &s, write(ops)).await;
    let e = get(&c, Proto::H2, &s, &n).await.unwrap();
    assert_eq!(
        (e.encoding, e.value.to_vec()),
        (
            pb::ValueEncoding::VeLe64 as i32,
            7u64.to_le_bytes().to_vec()
        )
    );

    let big = key("big");
    let sum = |data: &str| pb::Mutation {
        mutation_type: pb::MutationType::MSum as i32,
        ..set(&big, &hex(data), pb::ValueEncoding::VeV8)
    };
    commit(
        &c,
        Proto::H1,
        &s,
        write(vec![sum("ff0f5a020a"), sum("ff0f5a0301")]),
    )
    .await; // 10n + -1n
    let e = get(&c, Proto::H1, &s, &big).await.unwrap();
    assert_eq!(
        to_hex(&e.value),
        "ff0f5a100900000000000000",
        "9n, padded as V8 writes BigInts"
    );
    let r = c
        .data(
            Proto::H1,
            &s,
            "atomic_write",
            write(vec![sum("ff0f4902")]).encode_to_vec(),
        )
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Cannot sum BigInt with Number")
    );
}

/// Sleeps until the wall clock (which expiries are compared with) is past `at_ms`.
async fn sleep_until_past(at_ms: i64) {
    let left = at_ms + 50 - denokv::kv::now_ms();
    if left > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(left as u64)).await;
    }
}

#[tokio::test]
async fn expiry_and_versionstamped_keys() {
    let s = Server::start(&[]);
    let c = Client::new();
    let now = denokv::kv::now_ms();
    // Long enough to read the key back before its expiry even on a loaded machine.
    let expiry = now + 2000;
    let (gone, stays) = (key("gone"), key("stays"));
    let w = write(vec![
        pb::Mutation {
            expire_at_ms: expiry,
            ..set(&gone, b"x", pb::ValueEncoding::VeBytes)
        },
        pb::Mutation {
            expire_at_ms: now + 3_600_000,
            ..set(&stays, b"x", pb::ValueEncoding::VeBytes)
        },
    ]);
    commit(&c, Proto::H2, &s, w).await;
    assert!(get(&c, Proto::H2, &s, &gone).await.is_some());
    sleep_until_past(expiry).await;
    assert!(
        get(&c, Proto::H2, &s, &gone).await.is_none(),
        "expired keys are never returned"
    );
    assert!(get(&c, Proto::H2, &s, &stays).await.is_some());

    let prefix = key("jobs");
    let m = pb::Mutation {
        mutation_type: pb::MutationType::MSetSuffixVersionstampedKey as i32,
        ..set(&prefix, b"job", pb::ValueEncoding::VeBytes)
    };
    let out = commit(&c, Proto::H2, &s, write(vec![m])).await;
    let mut k = prefix.to_vec();
    k.push(0x02);
    k.extend_from_slice(to_hex(&out.versionstamp).as_bytes());
    k.push(0);
    let e = get(&c, Proto::H2, &s, &Bytes::from(k))
        .await
        .expect("written at prefix ++ hex(versionstamp)");
    assert_eq!(e.versionstamp, out.versionstamp);
}

#[tokio::test]
async fn enqueue_validation_and_storage() {
    let s = Server::start(&[]);
    let c = Client::new();
    let now = denokv::kv::now_ms();
    let e = |deadline_ms| pb::Enqueue {
        payload: Bytes::from(hex("ff0f4902")),
        deadline_ms,
        keys_if_undelivered: vec![key("dlq")],
        backoff_schedule: vec![100, 200],
    };
    for deadline in [0, now, now + 2_592_000_000 - 10_000] {
        let w = pb::AtomicWrite {
            enqueues: vec![e(deadline)],
            ..Default::default()
        };
        assert_eq!(
            commit(&c, Proto::H1, &s, w).await.status,
            pb::AtomicWriteStatus::AwSuccess as i32
        );
    }
    for deadline in [-1, now + 2_592_000_000 + 60_000] {
        let w = pb::AtomicWrite {
            enqueues: vec![e(deadline)],
            ..Default::default()
        };
        let r = c
            .data(Proto::H1, &s, "atomic_write", w.encode_to_vec())
            .await;
        assert_eq!(
            (r.status, r.text().as_str()),
            (400, "Invalid mutation enqueue deadline."),
            "{deadline}"
        );
    }
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM queue", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn read_only_mode_answers_write_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    {
        let mut rw = Server::start_on(&db, &[]);
        let c = Client::new();
        commit(
            &c,
            Proto::H2,
            &rw,
            write(vec![set(&key("a"), b"x", pb::ValueEncoding::VeBytes)]),
        )
        .await;
        drop(c);
        let status = tokio::task::spawn_blocking(move || rw.stop())
            .await
            .unwrap();
        assert!(status.success());
    }
    let ro = Server::start_on(&db, &["--read-only"]);
    let c = Client::new();
    assert!(get(&c, Proto::H2, &ro, &key("a")).await.is_some());
    let out = commit(
        &c,
        Proto::H2,
        &ro,
        write(vec![set(&key("b"), b"x", pb::ValueEncoding::VeBytes)]),
    )
    .await;
    assert_eq!(out.status, pb::AtomicWriteStatus::AwWriteDisabled as i32);
    // Invalid input is still a 400 first.
    let r = c
        .data(
            Proto::H2,
            &ro,
            "atomic_write",
            write(vec![set(&key("b"), b"1", pb::ValueEncoding::VeLe64)]).encode_to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn sum_min_max_clear_an_expiry_unless_they_set_one() {
    // SPEC §10 D13: upstream always clears; we keep that unless the mutation carries an expiry.
    let s = Server::start(&[]);
    let c = Client::new();
    // Both commits land long before the expiry, even on a loaded machine.
    let expiry = denokv::kv::now_ms() + 2000;
    let (cleared, kept) = (key("cleared"), key("kept"));
    let expiring = |k: &Bytes| pb::Mutation {
        expire_at_ms: expiry,
        ..le64_op(k, pb::MutationType::MSum, 1)
    };
    commit(
        &c,
        Proto::H2,
        &s,
        write(vec![expiring(&cleared), expiring(&kept)]),
    )
    .await;
    let w = write(vec![
        le64_op(&cleared, pb::MutationType::MSum, 1),
        expiring(&kept),
    ]);
    commit(&c, Proto::H2, &s, w).await;
    sleep_until_past(expiry).await;
    let e = get(&c, Proto::H2, &s, &cleared)
        .await
        .expect("a sum without expiry cleared the expiry");
    assert_eq!(e.value.to_vec(), 2u64.to_le_bytes());
    assert!(
        get(&c, Proto::H2, &s, &kept).await.is_none(),
        "a sum with an expiry set it"
    );
}

#[tokio::test]
async fn versionstamps_carry_the_stored_sequence() {
    // SPEC §10 D14: bytes 8-9 of a read versionstamp are the row's `seq` (set by replicas).
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut rw = Server::start_on(&db, &[]);
    let c = Client::new();
    let stamp = commit(
        &c,
        Proto::H2,
        &rw,
        write(vec![set(&key("a"), b"x", pb::ValueEncoding::VeBytes)]),
    )
    .await
    .versionstamp;
    drop(c);
    assert!(tokio::task::spawn_blocking(move || rw.stop())
        .await
        .unwrap()
        .success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE kv SET seq = 7", []).unwrap();
    drop(conn);
    let ro = Server::start_on(&db, &["--read-only"]);
    let c = Client::new();
    let e = get(&c, Proto::H2, &ro, &key("a")).await.unwrap();
    assert_eq!(e.versionstamp[..8], stamp[..8]);
    assert_eq!(e.versionstamp[8..], [0, 7]);
}

/// Each core's reader keeps its read snapshot for the reads that follow; once the server is
/// idle none is held, or a RESTART checkpoint (which waits for every reader of the WAL) could
/// never rewind the WAL.
#[tokio::test]
async fn an_idle_server_holds_no_read_snapshot_a_checkpoint_must_wait_for() {
    let s = Server::start(&[]);
    let c = Client::new();
    commit(
        &c,
        Proto::H1,
        &s,
        write(vec![set(&key("a"), b"x", pb::ValueEncoding::VeBytes)]),
    )
    .await;
    // The server's own checkpoint of that commit is done by then (at most one per 200 ms).
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    // Another process's commit, left in the WAL: readers from now on read the WAL.
    let other = rusqlite::Connection::open(&s.db).unwrap();
    other
        .execute_batch(
            "PRAGMA wal_autocheckpoint = 0;
             BEGIN IMMEDIATE;
             UPDATE data_version SET version = version + 1 WHERE k = 0;
             COMMIT;",
        )
        .unwrap();
    for _ in 0..50 {
        for p in [Proto::H1, Proto::H2] {
            assert!(get(&c, p, &s, &key("a")).await.is_some());
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    other.busy_timeout(std::time::Duration::ZERO).unwrap();
    let mut busy = Vec::new();
    // A few tries: the server's poll for other processes' commits is a short read of its own.
    for _ in 0..3 {
        let (b, log, done): (i64, i64, i64) = other
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        if b == 0 {
            assert_eq!(log, done, "every frame checkpointed");
            return;
        }
        busy.push((b, log, done));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("a reader holds the WAL of an idle server: (busy, frames, checkpointed) {busy:?}");
}
