//! The real STS: the SDK client, configured as any AWS tool is but signing only with the
//! instance's credentials and bounded by the proxy's own timeouts, and how its errors are told
//! apart (a refusal of the role, or STS's own failure).
use super::*;

/// STS AssumeRole through the SDK.
pub struct Sts(pub aws_sdk_sts::Client);

/// Error codes with which STS says it is unusable right now (rather than refusing the role).
const UNUSABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
];

impl AssumeRole for Sts {
    fn assume<'a>(&'a self, key: &'a Key, duration: Duration) -> Assumed<'a> {
        Box::pin(async move {
            let sts_error = |message: String, failure: Failure| Error::Sts {
                role_arn: key.role_arn.clone(),
                message,
                failure,
            };
            let tags = key
                .tags
                .tags
                .iter()
                .map(|t| {
                    aws_sdk_sts::types::Tag::builder()
                        .key(&t.key)
                        .value(&t.value)
                        .build()
                        .expect("key and value are set")
                })
                .collect::<Vec<_>>();
            let output = self
                .0
                .assume_role()
                .role_arn(&key.role_arn)
                .role_session_name(&key.session_name)
                .duration_seconds(duration.as_secs() as i32)
                .set_external_id(key.external_id.clone())
                .set_tags((!tags.is_empty()).then_some(tags))
                .set_transitive_tag_keys(
                    (!key.tags.transitive.is_empty()).then(|| key.tags.transitive.clone()),
                )
                .set_source_identity(key.tags.source_identity.clone())
                .send()
                .await
                .map_err(|e| {
                    use aws_sdk_sts::error::{ProvideErrorMetadata as _, SdkError};
                    let mut message = match (e.code(), e.message()) {
                        // STS's own answer: its code and message say it all.
                        (Some(code), Some(message)) => format!("{code}: {message}"),
                        (Some(code), None) => code.to_owned(),
                        _ => one_line(&e),
                    };
                    let failure = match &e {
                        SdkError::ServiceError(service)
                            if service.raw().status().as_u16() >= 500
                                || e.code().is_some_and(|c| UNUSABLE_CODES.contains(&c)) =>
                        {
                            Failure::Unavailable
                        }
                        SdkError::ServiceError(_) => Failure::Refused(Refusal::of(&message)),
                        SdkError::TimeoutError(_) => Failure::TimedOut,
                        // A failed connection, an unreadable answer, or no instance
                        // credentials to sign with: nothing to do with the role.
                        _ => Failure::Unavailable,
                    };
                    if let Failure::Refused(refusal) = failure
                        && let Some(why) = refusal.way_out()
                    {
                        message = format!("{why} ({message})");
                    }
                    sts_error(message, failure)
                })?;
            let creds = output.credentials().ok_or_else(|| {
                sts_error("answer without credentials".into(), Failure::Unavailable)
            })?;
            let expiration = SystemTime::try_from(*creds.expiration())
                .map_err(|e| sts_error(format!("bad expiration: {e}"), Failure::Unavailable))?;
            Ok(Assumption {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                expiration,
            })
        })
    }
}

/// The STS client's bounds. Each attempt: 1 s to connect, 5 s for the answer (an STS slow by
/// seconds is still usable); three attempts with the SDK's jittered exponential back-off (from
/// 100 ms, at most 1 s apart); 12 s in all.
const STS_CONNECT: Duration = Duration::from_secs(1);
const STS_ATTEMPT: Duration = Duration::from_secs(5);
const STS_OPERATION: Duration = Duration::from_secs(12);
const STS_ATTEMPTS: u32 = 3;
/// Instance credentials are refreshed this long before they expire.
const INSTANCE_CREDENTIALS_AHEAD: Duration = Duration::from_secs(5 * 60);

/// The STS client, configured as any AWS tool is: `aws_config` loads the environment and the
/// shared config files (`AWS_ENDPOINT_URL_STS`/`AWS_ENDPOINT_URL`, `AWS_USE_FIPS_ENDPOINT`,
/// `AWS_USE_DUALSTACK_ENDPOINT`, `AWS_PROFILE`, `AWS_MAX_ATTEMPTS`/`AWS_RETRY_MODE`, ...), and the
/// proxy's flags win over them. Two things are never taken from there:
/// - the credentials: always the instance's, from the upstream IMDS (never `AWS_ACCESS_KEY_ID`
///   or a profile's keys: the proxy assumes roles as the instance);
/// - the timeouts: the bounds below, which every answer of the proxy relies on.
///
/// Region: `--region`, else `AWS_REGION`/`AWS_DEFAULT_REGION` or the profile's, else the
/// instance's (from the upstream IMDS). Retries: the bounds below unless `AWS_MAX_ATTEMPTS` or
/// `AWS_RETRY_MODE` is set.
pub async fn sts_client(
    upstream: &str,
    region: Option<&str>,
    endpoint: Option<&str>,
) -> anyhow::Result<aws_sdk_sts::Client> {
    use aws_config::meta::region::RegionProviderChain;
    // The IMDS client's own bounds (1 s to connect, 1 s to answer, 3 attempts) hold for the
    // region and the instance credentials.
    let imds_client = imds::Client::builder()
        .endpoint(upstream)
        .map_err(|e| anyhow::anyhow!("upstream {upstream}: {e}"))?
        .build();
    let region_chain = RegionProviderChain::first_try(region.map(|r| Region::new(r.to_owned())))
        .or_else(aws_config::environment::EnvironmentVariableRegionProvider::new())
        .or_else(aws_config::profile::ProfileFileRegionProvider::builder().build())
        .or_else(
            imds::region::ImdsRegionProvider::builder()
                .imds_client(imds_client.clone())
                .build(),
        );
    let region = region_chain.region().await.ok_or_else(|| {
        anyhow::anyhow!(
            "no region: no --region, no AWS_REGION or profile region, and the upstream IMDS did \
             not say one"
        )
    })?;
    let provider = imds::credentials::ImdsCredentialsProvider::builder()
        .imds_client(imds_client)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .credentials_provider(provider)
        // Instance credentials are fetched again well before they expire, so a rotation on the
        // instance is picked up before the old ones stop working.
        .identity_cache(
            aws_sdk_sts::config::IdentityCache::lazy()
                .buffer_time(INSTANCE_CREDENTIALS_AHEAD)
                .build(),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(STS_CONNECT)
                .read_timeout(STS_ATTEMPT)
                .operation_attempt_timeout(STS_ATTEMPT)
                .operation_timeout(STS_OPERATION)
                .build(),
        );
    let retries_from_environment = ["AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if !retries_from_environment {
        loader = loader.retry_config(
            RetryConfig::standard()
                .with_max_attempts(STS_ATTEMPTS)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(1)),
        );
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let shared = loader.load().await;
    tracing::info!(
        region = %shared.region().map(|r| r.to_string()).unwrap_or_default(),
        endpoint = endpoint
            .map(str::to_owned)
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_STS").ok())
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
            .unwrap_or_else(|| "the regional endpoint".to_owned()),
        fips = shared.use_fips().unwrap_or(false),
        retries = if retries_from_environment { "from the environment" } else { "3 attempts" },
        "STS client configured"
    );
    Ok(aws_sdk_sts::Client::new(&shared))
}

/// An error and its causes in one line (`a: b: c`), without the SDK's Debug dump; a cause whose
/// text the line already holds is left out.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = e.source();
    }
    line
}
