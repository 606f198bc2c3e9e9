//! A request before it is put on the wire: method, path, headers and body, and the mutations
//! of its headers and request line that HTTP/1.1 and HTTP/2 share.

use rand::rngs::StdRng;
use rand::Rng;

use super::gen::{self, Route};

/// The tokens the fuzzer may put in requests. The sentinel token is not among them: no
/// fuzzed request can carry it.
#[derive(Clone, Debug)]
pub struct Creds {
    /// Read-write under `["fuzz"]`.
    pub fuzz: String,
    /// Read-only under `["fuzz"]`.
    pub read: String,
    /// A session token of `fuzz`, from the metadata exchange.
    pub session: String,
}

/// How the body is framed on HTTP/1.1.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Framing {
    /// `Content-Length` with the true length.
    Length,
    /// `Content-Length` with this (lying or malformed) value, maybe repeated.
    LengthValue(Vec<Vec<u8>>),
    /// `Transfer-Encoding: chunked`, chunks of these sizes, then the last chunk; `bad` replaces
    /// the size line of one chunk, `end` the last chunk and trailers.
    Chunked {
        sizes: Vec<usize>,
        bad: Option<(usize, Vec<u8>)>,
        end: Vec<u8>,
    },
    /// No length at all.
    None,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Req {
    pub route: Route,
    pub method: Vec<u8>,
    pub path: Vec<u8>,
    /// Lower-case names as Deno sends them, except where a mutation changed that.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub framing: Framing,
}

const NIL_ID: &str = "00000000-0000-0000-0000-000000000000";

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

impl Req {
    /// A valid request of `route` with the fuzzed token (or its session token).
    pub fn valid(route: Route, creds: &Creds, rng: &mut StdRng, now_ms: i64) -> Req {
        let token = match (route, rng.random_range(0..10)) {
            // The metadata exchange takes long-lived tokens only.
            (Route::Metadata, _) | (_, 0..=6) => &creds.fuzz,
            (_, 7 | 8) => &creds.session,
            _ => &creds.read,
        };
        let mut headers = vec![(
            b"authorization".to_vec(),
            format!("Bearer {token}").into_bytes(),
        )];
        if route != Route::Metadata {
            let version = if rng.random_bool(0.8) { "3" } else { "2" };
            headers.push((b"x-denokv-version".to_vec(), version.into()));
            headers.push((b"x-denokv-database-id".to_vec(), NIL_ID.into()));
        }
        headers.push((b"content-type".to_vec(), route.content_type().into()));
        headers.push((b"user-agent".to_vec(), b"Deno/2.1.4".to_vec()));
        Req {
            route,
            method: b"POST".to_vec(),
            path: route.path().into(),
            headers,
            body: gen::valid_body(route, rng, now_ms),
            framing: Framing::Length,
        }
    }

    fn header_index(&self, name: &[u8]) -> Option<usize> {
        self.headers
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    fn set_header(&mut self, name: &[u8], value: Vec<u8>) {
        match self.header_index(name) {
            Some(i) => self.headers[i].1 = value,
            None => self.headers.push((name.to_vec(), value)),
        }
    }

    fn remove_header(&mut self, name: &[u8]) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// Mutates the body, the headers or the method and path (one or more of them), or leaves
    /// the request valid (about one in six), so that valid paths run too.
    pub fn mutate(&mut self, other_body: &[u8], creds: &Creds, rng: &mut StdRng) {
        if rng.random_ratio(1, 6) {
            return;
        }
        loop {
            match rng.random_range(0..20) {
                0..=9 => gen::mutate_body(&mut self.body, other_body, rng),
                10..=16 => self.mutate_header(creds, rng),
                _ => self.mutate_line(rng),
            }
            if rng.random_bool(0.6) {
                break;
            }
        }
    }

    fn mutate_line(&mut self, rng: &mut StdRng) {
        if rng.random_bool(0.5) {
            let methods: &[&[u8]] = &[
                b"GET",
                b"PUT",
                b"DELETE",
                b"HEAD",
                b"OPTIONS",
                b"PATCH",
                b"TRACE",
                b"CONNECT",
                b"PRI",
                b"post",
                b"P0ST",
                b"POST ",
                b"",
                b"\xffPOST",
                b"M-SEARCH",
            ];
            self.method = if rng.random_ratio(1, 20) {
                vec![b'P'; rng.random_range(100..20_000)]
            } else {
                pick(rng, methods).to_vec()
            };
        } else {
            let route = self.route.path();
            let paths: Vec<Vec<u8>> = vec![
                format!("{route}?q=1").into(),
                format!("/{route}").into(),
                format!("{route}/").into(),
                route.to_uppercase().into(),
                format!("/v2/../{}", route.trim_start_matches('/')).into(),
                route.replace('/', "%2F").into(),
                format!("{route}#frag").into(),
                format!("http://127.0.0.1{route}").into(),
                b"*".to_vec(),
                b"".to_vec(),
                b"/v3/snapshot_read".to_vec(),
                b"/v2".to_vec(),
                b"/metrics".to_vec(),
                b"/v2/watch/../atomic_write".to_vec(),
                format!("{route}\0").into(),
                format!("{route}\u{e9}").into(),
                [b'/'; 1].repeat(rng.random_range(1..70_000)),
            ];
            self.path = pick(rng, &paths).clone();
        }
    }

    fn mutate_header(&mut self, creds: &Creds, rng: &mut StdRng) {
        match rng.random_range(0..10) {
            0..=2 => self.mutate_authorization(creds, rng),
            3 => {
                let values: &[&[u8]] = &[
                    b"1",
                    b"4",
                    b"",
                    b"03",
                    b" 3",
                    b"3 ",
                    b"2,3",
                    b"3\x00",
                    b"99999999999999999999",
                    b"\xff",
                    b"v3",
                    b"-3",
                ];
                let v = pick(rng, values).to_vec();
                if rng.random_ratio(1, 6) {
                    self.remove_header(b"x-denokv-version");
                } else if rng.random_ratio(1, 5) {
                    self.headers.push((b"x-denokv-version".to_vec(), v));
                } else {
                    self.set_header(b"x-denokv-version", v);
                }
            }
            4 => {
                let values: &[&[u8]] = &[
                    b"00000000-0000-0000-0000-000000000001",
                    b"{00000000-0000-0000-0000-000000000000}",
                    b"urn:uuid:00000000-0000-0000-0000-000000000000",
                    b"00000000000000000000000000000000",
                    b"0",
                    b"",
                    b"00000000-0000-0000-0000-00000000000\xff",
                ];
                if rng.random_ratio(1, 4) {
                    self.remove_header(b"x-denokv-database-id");
                } else {
                    self.set_header(b"x-denokv-database-id", pick(rng, values).to_vec());
                }
            }
            5 => {
                let values: &[&[u8]] = &[
                    b"text/plain",
                    b"application/json",
                    b"application/x-protobuf; charset=\xff",
                    b"",
                    b"multipart/form-data; boundary=x",
                ];
                if rng.random_ratio(1, 3) {
                    self.remove_header(b"content-type");
                } else {
                    self.set_header(b"content-type", pick(rng, values).to_vec());
                }
            }
            6 => self.mutate_framing(rng),
            7 => {
                // Headers that change how the connection behaves.
                let extra: &[(&[u8], &[u8])] = &[
                    (b"expect", b"100-continue"),
                    (b"expect", b"something-else"),
                    (b"connection", b"close"),
                    (b"connection", b"upgrade, http2-settings"),
                    (b"upgrade", b"h2c"),
                    (b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA"),
                    (b"upgrade", b"websocket"),
                    (b"te", b"trailers"),
                    (b"te", b"gzip"),
                    (b"host", b""),
                    (b"host", b"a b"),
                    (b"content-encoding", b"gzip"),
                    (b"keep-alive", b"timeout=1"),
                    (b":path", b"/v2/watch"),
                    (b"x-denokv-database-id", NIL_ID.as_bytes()),
                ];
                let (n, v) = pick(rng, extra);
                self.headers.push((n.to_vec(), v.to_vec()));
            }
            8 => {
                // Many, long or odd headers.
                match rng.random_range(0..5) {
                    0 => {
                        for i in 0..rng.random_range(90..300) {
                            self.headers
                                .push((format!("x-h{i}").into_bytes(), b"v".to_vec()));
                        }
                    }
                    1 => self.headers.push((
                        b"x-long".to_vec(),
                        vec![b'a'; rng.random_range(1000..200_000)],
                    )),
                    2 => self
                        .headers
                        .push((vec![b'n'; rng.random_range(100..70_000)], b"v".to_vec())),
                    3 => self.headers.push((b"X-Upper".to_vec(), b"v".to_vec())),
                    _ => self
                        .headers
                        .push((b"x-bin".to_vec(), b"\x00\x7f\xff".to_vec())),
                }
            }
            _ => {
                // A byte of some header changed: CR, LF, NUL, colon, space, non-ASCII.
                if self.headers.is_empty() {
                    return;
                }
                let i = rng.random_range(0..self.headers.len());
                let (name, value) = &mut self.headers[i];
                let target = if rng.random_bool(0.7) || name.is_empty() {
                    value
                } else {
                    name
                };
                let b = *pick(rng, b"\r\n\0: \t\xff\x80\"(".as_slice());
                let at = rng.random_range(0..=target.len());
                if rng.random_bool(0.5) && at < target.len() {
                    target[at] = b;
                } else {
                    target.insert(at, b);
                }
            }
        }
    }

    fn mutate_authorization(&mut self, creds: &Creds, rng: &mut StdRng) {
        let t = &creds.fuzz;
        let s = &creds.session;
        let values: Vec<Vec<u8>> = vec![
            b"Bearer".to_vec(),
            b"Bearer ".to_vec(),
            format!("bearer {t}").into(),
            format!("BEARER {t}").into(),
            format!("Bearer  {t}").into(),
            format!("Bearer {t} ").into(),
            format!("Bearer {t}x").into(),
            format!("Bearer {}", &t[..t.len() - 1]).into(),
            format!("Basic {t}").into(),
            format!("Bearer\t{t}").into(),
            format!("Bearer {}", &s[..s.len() - 2]).into(),
            format!("Bearer {s}.0").into(),
            format!("Bearer {}", s.replace('.', "..")).into(),
            b"Bearer denokv-session.".to_vec(),
            b"Bearer denokv-session.00.99999999999999999999.00".to_vec(),
            format!(
                "Bearer denokv-session.{}.{}.{}",
                "ab".repeat(16),
                u64::MAX,
                "cd".repeat(32)
            )
            .into(),
            format!(
                "Bearer denokv-session.{}.1.{}",
                "0".repeat(32),
                "0".repeat(128)
            )
            .into(),
            format!("Bearer {}", "x".repeat(rng.random_range(12..100_000))).into(),
            [b"Bearer ".as_slice(), &[0xff, 0xfe, 0x80]].concat(),
            format!("Bearer {}", creds.read).into(),
            b"".to_vec(),
        ];
        match rng.random_range(0..8) {
            0 => self.remove_header(b"authorization"),
            1 => {
                let v = pick(rng, &values).clone();
                self.headers.push((b"authorization".to_vec(), v));
            }
            _ => {
                let v = pick(rng, &values).clone();
                self.set_header(b"authorization", v);
            }
        }
    }

    fn mutate_framing(&mut self, rng: &mut StdRng) {
        let len = self.body.len();
        self.framing = match rng.random_range(0..10) {
            0 => Framing::LengthValue(vec![format!("{}", len + rng.random_range(1..100)).into()]),
            1 => Framing::LengthValue(vec![format!(
                "{}",
                len.saturating_sub(rng.random_range(1..10))
            )
            .into()]),
            2 => Framing::LengthValue(vec![pick(
                rng,
                &[
                    b"abc".as_slice(),
                    b"-1",
                    b"+5",
                    b" 5",
                    b"18446744073709551616",
                    b"99999999999",
                    b"0x10",
                    b"",
                    b"1,1",
                ],
            )
            .to_vec()]),
            3 => Framing::LengthValue(vec![
                len.to_string().into(),
                (len + rng.random_range(0..2)).to_string().into(),
            ]),
            4 => Framing::LengthValue(vec![(3u64 << 20).to_string().into()]),
            5 | 6 => {
                let mut sizes = Vec::new();
                let mut left = len;
                while left > 0 {
                    let n = rng.random_range(1..=left.min(4096));
                    sizes.push(n);
                    left -= n;
                }
                let bad = rng.random_bool(0.6).then(|| {
                    let i = rng.random_range(0..=sizes.len());
                    let line: Vec<u8> = pick(
                        rng,
                        &[
                            b"ffffffffffffffffff".as_slice(),
                            b"-1",
                            b"0x10",
                            b"zz",
                            b"",
                            b"5;ext=1",
                            b"5 ",
                            b"10000000",
                            b"1\n",
                        ],
                    )
                    .to_vec();
                    (i, line)
                });
                let end: Vec<u8> = pick(
                    rng,
                    &[
                        b"0\r\n\r\n".as_slice(),
                        b"0\r\n\r\n",
                        b"0\r\nx-trailer: 1\r\n\r\n",
                        b"0\r\n",
                        b"",
                        b"0;a=b\r\n\r\n",
                        b"0\r\n\r\nGARBAGE",
                    ],
                )
                .to_vec();
                Framing::Chunked { sizes, bad, end }
            }
            7 => Framing::None,
            _ => {
                // Content-Length next to chunked, or an odd Transfer-Encoding.
                let te: Vec<u8> = pick(
                    rng,
                    &[
                        b"chunked".as_slice(),
                        b"gzip, chunked",
                        b"chunked, gzip",
                        b"identity",
                        b"CHUNKED",
                        b"chunked\x00",
                    ],
                )
                .to_vec();
                self.headers.push((b"transfer-encoding".to_vec(), te));
                Framing::Length
            }
        };
    }
}
