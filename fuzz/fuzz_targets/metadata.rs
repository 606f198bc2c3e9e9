//! POST /: the metadata exchange's JSON and version negotiation (SPEC §1.3).
#![no_main]

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use denokv::http::metadata;
use http_body::Body as _;
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "fuzz-token";
const URL: &str = "http://127.0.0.1:4512/v2";

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    let response = match metadata::exchange(&body, TOKEN, std::time::SystemTime::now(), URL) {
        Ok(r) => r,
        Err(e) => {
            // Bad input is a 400, never a 5xx.
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{e:?}");
            return;
        }
    };
    assert_eq!(response.status(), http::StatusCode::OK);
    // A full body is ready at once: poll it without a runtime.
    let mut out = Vec::new();
    let mut b = pin!(response.into_body());
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(frame)) = b.as_mut().poll_frame(&mut cx) {
        if let Ok(data) = frame.unwrap().into_data() {
            out.extend_from_slice(&data);
        }
    }
    // The chosen version is 2 or 3 and one the client offered.
    let json: serde_json::Value = serde_json::from_slice(&out).expect("answer is JSON");
    let version = json["version"].as_i64().expect("version");
    assert!(version == 2 || version == 3);
    assert_eq!(json["token"], TOKEN);
    // The server skips unknown fields without reading them, so it takes bodies that a full
    // parse refuses (`{"x":1e99999,...}`, number out of range); check those no further.
    let Ok(offered) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // serde also reads a struct from a JSON array of its fields: `[[2,3]]` is accepted too.
    let offered = match &offered {
        serde_json::Value::Array(fields) => &fields[0],
        object => &object["supportedVersions"],
    };
    let offered = offered.as_array().expect("offered versions");
    assert!(offered.iter().any(|v| v.as_i64() == Some(version)));
});
