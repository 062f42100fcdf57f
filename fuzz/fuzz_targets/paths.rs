//! Any request path: the check never panics, and what it lets through never routes a container to
//! something it must not reach.
#![no_main]
use imds_policy::paths::{Exposure, Route, checked, route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|path: &str| {
    let Some(path) = checked(path) else { return };
    // What passed the check has no escapes, dot segments, empty segments or invisible bytes.
    assert!(path.starts_with('/'));
    assert!(
        path.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._~-:@=+,".contains(&b)),
        "{path:?}"
    );
    let inner = path.strip_suffix('/').unwrap_or(path);
    if inner.len() > 1 {
        assert!(
            inner[1..].split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
            "{path:?}"
        );
    }
    for exposure in [
        Exposure::default(),
        Exposure {
            user_data: true,
            identity_signatures: true,
        },
    ] {
        let r = route(path, exposure);
        let rest = path[1..]
            .split_once('/')
            .map_or(String::new(), |(_, rest)| rest.to_ascii_lowercase());
        match r {
            Route::RoleCredentials(name) => {
                assert!(!name.is_empty() && !name.contains('/'), "{path:?}");
                assert!(path.starts_with("/latest/"), "{path:?}");
            }
            Route::PassThrough => {
                // Never the instance's role or its identity credentials, in any API version.
                assert!(!rest.starts_with("meta-data/iam"), "{path:?}");
                assert!(!rest.starts_with("meta-data/identity-credentials"), "{path:?}");
                if !exposure.user_data {
                    assert!(!rest.starts_with("user-data"), "{path:?}");
                }
                if !exposure.identity_signatures {
                    for signed in ["pkcs7", "signature", "rsa2048"] {
                        let denied = format!("dynamic/instance-identity/{signed}");
                        assert!(!rest.starts_with(&denied), "{path:?}");
                    }
                }
            }
            _ => {}
        }
    }
});
