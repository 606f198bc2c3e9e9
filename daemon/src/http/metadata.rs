//! The metadata exchange, `POST /` (SPEC §1.3).

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Response};
use serde::{Deserialize, Serialize};

use super::body::{full, Body};
use super::error::ApiError;

/// The database id upstream advertises and clients echo back.
pub const DATABASE_ID: &str = "00000000-0000-0000-0000-000000000000";
#[derive(Deserialize)]
struct MetadataRequest {
    #[serde(default, rename = "supportedVersions")]
    supported_versions: Vec<i64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MetadataResponse<'a> {
    version: i64,
    database_id: &'a str,
    endpoints: [Endpoint<'a>; 1],
    token: &'a str,
    expires_at: String,
}

#[derive(Serialize)]
struct Endpoint<'a> {
    url: &'a str,
    consistency: &'a str,
}

/// Answers an authenticated metadata request. Authentication runs first (SPEC §10 D10).
/// `token` is the session token for the data path, valid until `expires` (`expiresAt`).
pub fn exchange(
    body: &Bytes,
    token: &str,
    expires: SystemTime,
    endpoint_url: &str,
) -> Result<Response<Body>, ApiError> {
    let request: MetadataRequest = serde_json::from_slice(body).map_err(|_| {
        ApiError::bad_request(
            "The server requires at least protocol version 2. Use Deno 1.38.0 or newer.",
        )
    })?;
    let version = [3, 2].into_iter().find(|v| request.supported_versions.contains(v)).ok_or_else(|| {
        ApiError::bad_request(
            "The server could not negotiate a protocol version. The server requires protocol version 2 or 3.",
        )
    })?;
    let response = MetadataResponse {
        version,
        database_id: DATABASE_ID,
        endpoints: [Endpoint {
            url: endpoint_url,
            consistency: "strong",
        }],
        token,
        expires_at: rfc3339_millis(expires),
    };
    let json = serde_json::to_vec(&response).expect("metadata serializes");
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(json))
        .expect("static response parts are valid"))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339_utc() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_735_787_045_678);
        assert_eq!(rfc3339_millis(t), "2025-01-02T03:04:05.678Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    fn negotiate(body: &str) -> Result<serde_json::Value, String> {
        exchange(
            &Bytes::from(body.to_string()),
            "tok",
            SystemTime::now(),
            "/v2",
        )
        .map(|_| serde_json::Value::Null)
        .map_err(|e| e.message)
    }

    #[test]
    fn version_negotiation() {
        assert!(negotiate(r#"{"supportedVersions":[1,2,3]}"#).is_ok());
        assert!(negotiate(r#"{"supportedVersions":[2],"other":true}"#).is_ok());
        let too_old = "The server could not negotiate a protocol version. The server requires protocol version 2 or 3.";
        assert_eq!(
            negotiate(r#"{"supportedVersions":[1]}"#).unwrap_err(),
            too_old
        );
        assert_eq!(negotiate(r#"{}"#).unwrap_err(), too_old);
        let invalid = "The server requires at least protocol version 2. Use Deno 1.38.0 or newer.";
        assert_eq!(negotiate("").unwrap_err(), invalid);
        assert_eq!(
            negotiate(r#"{"supportedVersions":[2.0]}"#).unwrap_err(),
            invalid
        );
        assert_eq!(
            negotiate(r#"{"supportedVersions":["2"]}"#).unwrap_err(),
            invalid
        );
        assert_eq!(negotiate("[2,3]").unwrap_err(), invalid);
    }
}
