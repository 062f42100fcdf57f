//! Which IMDS paths a container may ask for, decided on the path alone: malformed spellings are
//! refused before anything else, the instance's role and identity are never passed through, and
//! every API version is treated like `latest`.

/// What a path is, after checking it.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `iam/security-credentials/` listing.
    RoleList,
    /// `iam/security-credentials/<name>`.
    RoleCredentials(&'a str),
    IamInfo,
    IamListing,
    /// Never served to a container.
    Denied,
    /// Served from the upstream.
    PassThrough,
}

/// Refuse what must never reach the upstream as it is: dot segments, empty segments, escapes,
/// anything outside visible ASCII. The path is used upstream only after this.
pub fn checked(path: &str) -> Option<&str> {
    // IMDS paths are letters, digits and a few marks (tag keys add `:@=+,`): no escapes, no
    // query or fragment, no path parameters, nothing a server might decode or fold.
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"/._~-:@=+,".contains(&b);
    if !path.starts_with('/') || path.len() > 512 || !path.bytes().all(allowed) {
        return None;
    }
    let inner = path.strip_suffix('/').unwrap_or(path);
    if inner.len() > 1
        && inner[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return None;
    }
    Some(path)
}

/// What the operator chose to pass through beyond the defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// `user-data`: often holds secrets.
    pub user_data: bool,
    /// `dynamic/instance-identity/{pkcs7,signature,rsa2048}`: proofs signed by AWS that this
    /// caller is the instance, with which Vault's or SPIRE's AWS auth logs in as the instance.
    pub identity_signatures: bool,
}

/// The signed forms of the instance identity document.
const IDENTITY_SIGNATURES: [&str; 3] = ["pkcs7", "signature", "rsa2048"];

/// What follows the API version in a checked path (`/latest/meta-data/x` → `meta-data/x`); empty
/// for the version alone.
pub fn after_version(path: &str) -> &str {
    path.get(1..)
        .and_then(|p| p.split_once('/'))
        .map_or("", |(_, rest)| rest)
}

pub fn route(path: &str, exposure: Exposure) -> Route<'_> {
    // Every version of the API (`latest`, `2021-03-23`, ...) leads to the same data: the rules
    // apply to what follows the version.
    let rest = after_version(path);
    let latest = path.starts_with("/latest/");
    let rest_trimmed = rest.strip_suffix('/').unwrap_or(rest);
    // Denials are decided blind to case and on prefixes, not whole segments: an upstream that
    // folded case or matched loosely is still never reached with a spelling of a denied path.
    let lower = rest.to_ascii_lowercase();
    if lower.starts_with("user-data") {
        return if exposure.user_data {
            Route::PassThrough
        } else {
            Route::Denied
        };
    }
    if let Some(doc) = lower.strip_prefix("dynamic/instance-identity/")
        && IDENTITY_SIGNATURES.iter().any(|s| doc.starts_with(s))
        && !exposure.identity_signatures
    {
        return Route::Denied;
    }
    if lower.starts_with("meta-data/identity-credentials") {
        return Route::Denied;
    }
    if lower.starts_with("meta-data/iam") {
        if !latest {
            return Route::Denied;
        }
        // Only these exact spellings; any other path under (or beside) `iam` is denied.
        return match rest_trimmed {
            "meta-data/iam" => Route::IamListing,
            "meta-data/iam/info" if !rest.ends_with('/') => Route::IamInfo,
            "meta-data/iam/security-credentials" => Route::RoleList,
            other => match other.strip_prefix("meta-data/iam/security-credentials/") {
                Some(name) if !name.contains('/') => Route::RoleCredentials(name),
                _ => Route::Denied,
            },
        };
    }
    Route::PassThrough
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_before_anything_else() {
        for bad in [
            "/latest/meta-data/../meta-data/iam/",
            "/latest/meta-data/./iam",
            "/latest//meta-data",
            "/latest/meta-data/%2e%2e/",
            "/latest/meta-data/iam\\x",
            "latest/meta-data",
            "/latest/meta-data/iam?x",
            "/latest/meta-data/iam#x",
            "/latest/meta-data/iam;x/security-credentials/",
            "/latest/meta-data/iam$",
            "/latest/meta-data/ iam",
        ] {
            assert_eq!(checked(bad), None, "{bad}");
        }
        for good in [
            "/",
            "/latest",
            "/latest/",
            "/latest/meta-data/",
            "/latest/meta-data/ami-id",
        ] {
            assert_eq!(checked(good), Some(good));
        }
    }

    #[test]
    fn routes() {
        let r = |p| route(p, Exposure::default());
        assert_eq!(
            r("/latest/meta-data/iam/security-credentials/"),
            Route::RoleList
        );
        assert_eq!(
            r("/latest/meta-data/iam/security-credentials"),
            Route::RoleList
        );
        assert_eq!(
            r("/latest/meta-data/iam/security-credentials/Web"),
            Route::RoleCredentials("Web")
        );
        assert_eq!(
            r("/latest/meta-data/iam/security-credentials/Web/"),
            Route::RoleCredentials("Web")
        );
        assert_eq!(
            r("/latest/meta-data/iam/security-credentials/a/b"),
            Route::Denied
        );
        assert_eq!(r("/latest/meta-data/iam/info"), Route::IamInfo);
        assert_eq!(r("/latest/meta-data/iam/"), Route::IamListing);
        assert_eq!(r("/latest/meta-data/iam/other"), Route::Denied);
        // Other API versions never reach the instance role.
        assert_eq!(
            r("/2021-03-23/meta-data/iam/security-credentials/InstanceRole"),
            Route::Denied
        );
        assert_eq!(r("/1.0/meta-data/iam/info"), Route::Denied);
        assert_eq!(
            r("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance"),
            Route::Denied
        );
        assert_eq!(
            r("/2021-03-23/meta-data/identity-credentials/"),
            Route::Denied
        );
        assert_eq!(r("/latest/user-data"), Route::Denied);
        assert_eq!(r("/2021-03-23/user-data/"), Route::Denied);
        let user_data = Exposure {
            user_data: true,
            ..Exposure::default()
        };
        assert_eq!(route("/latest/user-data", user_data), Route::PassThrough);
        for signed in [
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest/dynamic/instance-identity/signature",
            "/latest/dynamic/instance-identity/rsa2048",
            "/latest/dynamic/instance-identity/rsa2048/",
            "/2021-03-23/dynamic/instance-identity/pkcs7",
        ] {
            assert_eq!(r(signed), Route::Denied, "{signed}");
            let signatures = Exposure {
                identity_signatures: true,
                ..Exposure::default()
            };
            assert_eq!(route(signed, signatures), Route::PassThrough, "{signed}");
        }
        assert_eq!(r("/latest/meta-data/instance-id"), Route::PassThrough);
        assert_eq!(
            r("/latest/dynamic/instance-identity/document"),
            Route::PassThrough
        );
        assert_eq!(r("/"), Route::PassThrough);
        // Spellings an upstream might fold or match loosely are denied.
        for denied in [
            "/latest/meta-data/IAM/security-credentials/InstanceRole",
            "/latest/meta-data/Iam/",
            "/latest/meta-data/iamx",
            "/latest/meta-data/iam/security-credentials/a/b",
            "/latest/meta-data/Identity-Credentials/ec2/info",
            "/latest/User-Data",
            "/latest/user-data.sh",
            "/latest/dynamic/instance-identity/PKCS7",
            "/latest/dynamic/instance-identity/signature2",
        ] {
            assert_eq!(r(denied), Route::Denied, "{denied}");
        }
    }
}
