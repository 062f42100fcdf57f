//! An image must not choose its own role: the role label, the external-id label and `IAM_ROLE`
//! count only when set on the container itself, not inherited from its image (unless
//! `--trust-image-role`).
use std::collections::HashMap;

/// The role-bearing settings the proxy reads from a container's configuration.
pub(super) const ROLE_LABELS: [&str; 2] =
    [crate::roles::ROLE_LABEL, crate::roles::EXTERNAL_ID_LABEL];

/// An image's own labels and environment.
#[derive(Debug, Default)]
pub(super) struct ImageConfig {
    pub(super) labels: HashMap<String, String>,
    pub(super) env: Vec<String>,
}

/// Take out of a container's labels and environment the role settings it only has because its
/// image set them (same key, same value): an image must not choose its own role. Returns what
/// was taken out, for the log.
pub(super) fn without_image_roles(
    labels: &mut HashMap<String, String>,
    env: &mut Vec<String>,
    image_labels: &HashMap<String, String>,
    image_env: &[String],
) -> Vec<String> {
    let mut ignored = Vec::new();
    for key in ROLE_LABELS {
        if let (Some(value), Some(image_value)) = (labels.get(key), image_labels.get(key))
            && value == image_value
        {
            ignored.push(format!("label {key}={value:?}"));
            labels.remove(key);
        }
    }
    let prefix = format!("{}=", crate::roles::ROLE_ENV);
    env.retain(|entry| {
        let from_image = entry.starts_with(&prefix) && image_env.iter().any(|e| e == entry);
        if from_image {
            ignored.push(format!("env {entry:?}"));
        }
        !from_image
    });
    ignored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn role_settings_from_the_image_are_taken_out() {
        let image_labels = labels(&[
            ("iam.amazonaws.com/role", "Admin"),
            ("iam.amazonaws.com/external-id", "img-secret"),
            ("maintainer", "someone"),
        ]);
        let image_env = vec!["IAM_ROLE=Admin".to_owned(), "PATH=/bin".to_owned()];
        // A container that only inherited them.
        let mut l = image_labels.clone();
        let mut e = image_env.clone();
        let ignored = without_image_roles(&mut l, &mut e, &image_labels, &image_env);
        assert_eq!(l, labels(&[("maintainer", "someone")]));
        assert_eq!(e, vec!["PATH=/bin".to_owned()]);
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        // A container whose runner set its own values: kept.
        let mut l = labels(&[
            ("iam.amazonaws.com/role", "Web"),
            ("iam.amazonaws.com/external-id", "mine"),
        ]);
        let mut e = vec!["IAM_ROLE=Worker".to_owned()];
        let ignored = without_image_roles(&mut l, &mut e, &image_labels, &image_env);
        assert!(ignored.is_empty());
        assert_eq!(
            l.get("iam.amazonaws.com/role").map(String::as_str),
            Some("Web")
        );
        assert_eq!(e, vec!["IAM_ROLE=Worker".to_owned()]);
        // An image without role settings takes nothing out.
        let mut l = labels(&[("iam.amazonaws.com/role", "Web")]);
        let mut e = vec!["IAM_ROLE=Web".to_owned()];
        assert!(without_image_roles(&mut l, &mut e, &HashMap::new(), &[]).is_empty());
        assert_eq!(l.len(), 1);
        assert_eq!(e.len(), 1);
    }
}
