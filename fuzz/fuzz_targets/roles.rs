//! Any role value a container can set: parsing never panics, and what it accepts is within IAM's
//! grammar (so it is safe to log, to append to the prefix, and to send to STS).
#![no_main]
use imds_policy::roles::RoleName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &str| {
    let Ok(role) = RoleName::parse(value) else { return };
    let text = match &role {
        RoleName::Name(name) => name.as_str(),
        RoleName::Arn(arn) => arn.as_str(),
    };
    assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{value:?}");
    let path = match &role {
        RoleName::Name(name) => name.as_str(),
        RoleName::Arn(arn) => arn.split_once(":role/").expect("a role ARN").1,
    };
    assert!(
        path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."),
        "{value:?}"
    );
    let name = path.rsplit('/').next().unwrap_or_default();
    assert!((1..=64).contains(&name.len()), "{value:?}");
});
