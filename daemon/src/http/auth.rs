//! Bearer-token authentication.

use http::HeaderMap;

use super::error::ApiError;

/// The access tokens this server accepts.
#[derive(Clone)]
pub struct Tokens {
    tokens: Vec<String>,
}

impl Tokens {
    pub fn new(tokens: Vec<String>) -> Self {
        Tokens { tokens }
    }

    /// Checks the `Authorization` header (SPEC §1.3.2 steps 3–4) and returns the token used.
    /// The header is split at the first space; the scheme is `bearer` in any case.
    pub fn authenticate<'a>(&self, headers: &'a HeaderMap) -> Result<&'a str, ApiError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(ApiError::malformed_authorization)?;
        let (scheme, token) = value
            .split_once(' ')
            .ok_or_else(ApiError::malformed_authorization)?;
        let mut ok = false;
        for t in &self.tokens {
            // Visit every token so the time taken does not tell which one was close.
            ok |= constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        if scheme.eq_ignore_ascii_case("bearer") && ok {
            Ok(token)
        } else {
            Err(ApiError::invalid_token())
        }
    }
}

/// Compares in time that depends only on the lengths (SPEC §10 D9).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(header: Option<&str>) -> Result<String, String> {
        let mut h = HeaderMap::new();
        if let Some(v) = header {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        }
        let tokens = Tokens::new(vec!["0123456789abcdef".into(), "second token 1".into()]);
        tokens
            .authenticate(&h)
            .map(str::to_string)
            .map_err(|e| e.message)
    }

    #[test]
    fn authorization_rules() {
        assert_eq!(
            check(Some("Bearer 0123456789abcdef")).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            check(Some("bEaReR 0123456789abcdef")).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            check(Some("Bearer second token 1")).unwrap(),
            "second token 1",
            "split at the first space"
        );
        assert_eq!(check(None).unwrap_err(), "Malformed authorization header.");
        assert_eq!(
            check(Some("Bearer")).unwrap_err(),
            "Malformed authorization header."
        );
        assert_eq!(
            check(Some("Bearer wrong-token-123")).unwrap_err(),
            "Invalid access token."
        );
        assert_eq!(
            check(Some("Basic 0123456789abcdef")).unwrap_err(),
            "Invalid access token."
        );
        assert_eq!(
            check(Some("Bearer  0123456789abcdef")).unwrap_err(),
            "Invalid access token."
        );
    }
}
