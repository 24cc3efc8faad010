//! Who may do what. With `--auth-tokens FILE` (a `[tokens]` table of
//! `"TOKEN" = "ROLE"`) and/or `--jwt-key FILE` (an HS256 secret, or an RSA
//! or EC public key in PEM for RS256/ES256; the JWT carries `role` and
//! `exp`), every client call needs `authorization: Bearer <token>`:
//!
//! | role | may |
//! |---|---|
//! | `reader` | get, list, watch, cluster status, metrics, the dashboard |
//! | `app` | and begin, enlist, commit, abort, submit sagas and messages |
//! | `operator` | and repair (retry, resolve) and change membership |
//!
//! Missing, unknown, forged or expired → UNAUTHENTICATED (401); a role
//! below what the call needs → PERMISSION_DENIED (403). Open without a
//! token: health checks, reflection, a node's own status (peers ask it)
//! and the peer transport, which mutual TLS guards instead.
//! Without either flag, nothing is checked (the loopback default).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    App,
    Operator,
}

impl Role {
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "reader" => Some(Role::Reader),
            "app" => Some(Role::App),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::App => "app",
            Role::Operator => "operator",
        }
    }
}

/// Why a call was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
}

pub struct Auth {
    tokens: HashMap<String, Role>,
    jwt: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
}

impl std::fmt::Debug for Auth {
    /// Never the tokens themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Claims {
    role: String,
}

/// Tokens are at least this long: a short one can be guessed.
const TOKEN_BYTES_MIN: usize = 16;

impl Auth {
    /// `None` when neither file is given (nothing is checked).
    pub fn load(
        tokens: Option<&Path>,
        jwt_key: Option<&Path>,
    ) -> Result<Option<Arc<Auth>>, String> {
        if tokens.is_none() && jwt_key.is_none() {
            return Ok(None);
        }
        let mut table = HashMap::new();
        if let Some(path) = tokens {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--auth-tokens {}: {e}", path.display()))?;
            let file: TokensFile = toml::from_str(&text).map_err(|e| {
                format!(
                    "--auth-tokens {}: {e} (expected a [tokens] table of \"TOKEN\" = \"ROLE\")",
                    path.display()
                )
            })?;
            for (token, role) in file.tokens {
                let role = Role::from_name(&role).ok_or_else(|| {
                    format!(
                        "--auth-tokens {}: role {role:?} is not reader, app or operator",
                        path.display()
                    )
                })?;
                if token.len() < TOKEN_BYTES_MIN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "--auth-tokens {}: a token must be at least {TOKEN_BYTES_MIN} printable characters without spaces",
                        path.display()
                    ));
                }
                table.insert(token, role);
            }
        }
        let jwt = match jwt_key {
            None => None,
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("--jwt-key {}: {e}", path.display()))?;
                let text = String::from_utf8_lossy(&bytes);
                use jsonwebtoken::{Algorithm, DecodingKey, Validation};
                let (key, algorithm) = if text.contains("-----BEGIN") {
                    match DecodingKey::from_rsa_pem(&bytes) {
                        Ok(key) => (key, Algorithm::RS256),
                        Err(_) => (
                            DecodingKey::from_ec_pem(&bytes).map_err(|e| {
                                format!(
                                    "--jwt-key {}: not an RSA or EC public key: {e}",
                                    path.display()
                                )
                            })?,
                            Algorithm::ES256,
                        ),
                    }
                } else {
                    let secret = text.trim();
                    if secret.len() < 32 {
                        return Err(format!(
                            "--jwt-key {}: an HS256 secret must be at least 32 bytes",
                            path.display()
                        ));
                    }
                    (
                        DecodingKey::from_secret(secret.as_bytes())
                            .map_err(|e| format!("--jwt-key {}: {e}", path.display()))?,
                        Algorithm::HS256,
                    )
                };
                let mut validation = Validation::new(algorithm);
                validation.set_required_spec_claims(&["exp"]);
                validation.leeway = 5;
                validation.validate_aud = false;
                Some((key, validation))
            }
        };
        Ok(Some(Arc::new(Auth { tokens: table, jwt })))
    }

    /// The role of a bearer credential (`authorization` header value).
    pub fn role_of(&self, authorization: Option<&str>) -> Result<Role, Refusal> {
        let Some(value) = authorization else {
            return Err(Refusal::Unauthenticated(
                "this node requires a token: send `authorization: Bearer <token>` (CLI: --token or TANDEM_TOKEN)"
                    .into(),
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Refusal::Unauthenticated("the authorization is not `Bearer <token>`".into())
            })?;
        if let Some(role) = self.tokens.get(token) {
            return Ok(*role);
        }
        if let Some((key, validation)) = &self.jwt
            && token.matches('.').count() == 2
        {
            return match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => Role::from_name(&data.claims.role).ok_or_else(|| {
                    Refusal::Unauthenticated(format!(
                        "the token's role {:?} is not reader, app or operator",
                        data.claims.role
                    ))
                }),
                Err(e) => Err(Refusal::Unauthenticated(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        "the token has expired".to_string()
                    }
                    _ => format!("the token was refused: {e}"),
                })),
            };
        }
        Err(Refusal::Unauthenticated("unknown token".into()))
    }

    /// Checks a credential against the role `need`s.
    pub fn check(
        &self,
        authorization: Option<&str>,
        need: Role,
        what: &str,
    ) -> Result<Role, Refusal> {
        let role = self.role_of(authorization)?;
        if role < need {
            return Err(Refusal::PermissionDenied(format!(
                "a {} token may not {what}: it needs the {} role",
                role.name(),
                need.name()
            )));
        }
        Ok(role)
    }
}

/// The role a gRPC method needs; `None`: open to all.
pub fn grpc_role(path: &str) -> Option<Role> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match service {
        "tandem.v1.Coordinator" => Some(match method {
            "Get" | "List" => Role::Reader,
            "Retry" | "Resolve" => Role::Operator,
            _ => Role::App,
        }),
        "tandem.v1.Cluster" => match method {
            "LocalStatus" => None,
            "Status" => Some(Role::Reader),
            _ => Some(Role::Operator),
        },
        "tandem.v1.Debug" => Some(Role::Operator),
        // Health, reflection, and the peer transport (mutual TLS).
        _ => None,
    }
}

/// The role an HTTP request needs; `None`: open to all.
pub fn http_role(method: &axum::http::Method, path: &str) -> Option<Role> {
    if path == "/openapi.json" || path == "/ui/login" || path == "/" {
        return None;
    }
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return Some(Role::Reader);
    }
    if path.ends_with("/retry") || path.ends_with("/resolve") {
        return Some(Role::Operator);
    }
    Some(Role::App)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &str) -> Arc<Auth> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, tokens).unwrap();
        Auth::load(Some(&path), None).unwrap().unwrap()
    }

    #[test]
    fn roles_are_ordered_and_checked() {
        let a = auth(
            "[tokens]\n\"reader-0123456789abcdef\" = \"reader\"\n\"app-0123456789abcdef\" = \"app\"\n\"op-0123456789abcdef\" = \"operator\"\n",
        );
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            a.role_of(Some(&bearer("app-0123456789abcdef"))),
            Ok(Role::App)
        );
        assert!(matches!(a.role_of(None), Err(Refusal::Unauthenticated(_))));
        assert!(matches!(
            a.role_of(Some(&bearer("nope-nope-nope-nope"))),
            Err(Refusal::Unauthenticated(_))
        ));
        assert!(matches!(
            a.role_of(Some("app-0123456789abcdef")),
            Err(Refusal::Unauthenticated(_))
        ));
        let e = a
            .check(
                Some(&bearer("reader-0123456789abcdef")),
                Role::App,
                "call Begin",
            )
            .unwrap_err();
        assert_eq!(
            e,
            Refusal::PermissionDenied(
                "a reader token may not call Begin: it needs the app role".into()
            )
        );
        assert!(
            a.check(Some(&bearer("op-0123456789abcdef")), Role::App, "x")
                .is_ok()
        );
        assert_eq!(grpc_role("/tandem.v1.Coordinator/Begin"), Some(Role::App));
        assert_eq!(
            grpc_role("/tandem.v1.Coordinator/Resolve"),
            Some(Role::Operator)
        );
        assert_eq!(
            grpc_role("/tandem.v1.Cluster/RemoveNode"),
            Some(Role::Operator)
        );
        assert_eq!(grpc_role("/tandem.v1.Cluster/LocalStatus"), None);
        assert_eq!(grpc_role("/tandem.v1.RaftTransport/Stream"), None);
        assert_eq!(grpc_role("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn bad_token_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        for (text, needle) in [
            ("[tokens]\n\"short\" = \"app\"\n", "at least 16"),
            (
                "[tokens]\n\"0123456789abcdef0\" = \"admin\"\n",
                "not reader, app or operator",
            ),
            ("tokens = 1\n", "[tokens] table"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Auth::load(Some(&path), None).err().unwrap();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn jwts_carry_a_role_and_expire() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.key");
        let secret = "a-secret-of-at-least-thirty-two-bytes!!";
        std::fs::write(&path, secret).unwrap();
        let a = Auth::load(None, Some(&path)).unwrap().unwrap();
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |role: &str, exp: u64| {
            encode(
                &Header::default(),
                &serde_json::json!({"role": role, "exp": exp, "sub": "svc"}),
                &key,
            )
            .unwrap()
        };
        let ok = token("operator", now + 60);
        assert_eq!(a.role_of(Some(&format!("Bearer {ok}"))), Ok(Role::Operator));
        let old = token("operator", now - 600);
        let e = a.role_of(Some(&format!("Bearer {old}"))).unwrap_err();
        assert_eq!(e, Refusal::Unauthenticated("the token has expired".into()));
        let other = encode(
            &Header::default(),
            &serde_json::json!({"role": "operator", "exp": now + 60}),
            &EncodingKey::from_secret(b"another-secret-of-thirty-two-bytes!!").unwrap(),
        )
        .unwrap();
        assert!(
            a.role_of(Some(&format!("Bearer {other}"))).is_err(),
            "forged"
        );
    }
}
