//! The data-path header checks (SPEC §1.4): version, authorization, database id.
//! Input: lines `name:value`; lines that are not a valid header are skipped.
#![no_main]

use std::sync::Arc;

use denokv::http::auth::{CoreTokens, SharedTokens, Tokens};
use denokv::http::check_data_path_headers;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "fuzz-token";

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let tokens = CoreTokens::new(Arc::new(SharedTokens::new(Tokens::new(vec![TOKEN.into()]))));
    match check_data_path_headers(&headers, &tokens) {
        Ok(_) => {
            // Passing needs every check to hold, on the first value of each header.
            let first = |n: &str| headers.get(n).map(|v| v.as_bytes().to_vec());
            let version = first("x-denokv-version").unwrap();
            assert!(version == b"2" || version == b"3");
            let auth = first("authorization").unwrap();
            assert!(auth.len() == 7 + TOKEN.len() && auth[..7].eq_ignore_ascii_case(b"bearer "));
            assert!(auth.ends_with(TOKEN.as_bytes()));
            assert!(first("x-denokv-database-id").is_some());
        }
        Err(e) => assert!(
            e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::UNAUTHORIZED,
            "{e:?}"
        ),
    }
});
