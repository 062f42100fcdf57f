//! The smallest real AWS SDK client: aws-config's default credential chain (which, in a container
//! with nothing configured, ends at IMDS) and STS GetCallerIdentity. Prints the caller's ARN, or
//! the SDK's error and exit status 1. Endpoint and region come from the usual environment
//! (`AWS_ENDPOINT_URL_STS`, `AWS_REGION`) or, for the region, from IMDS itself.
use aws_config::BehaviorVersion;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let sts = aws_sdk_sts::Client::new(&config);
    match sts.get_caller_identity().send().await {
        Ok(identity) => {
            println!("{}", identity.arn().unwrap_or("(no ARN)"));
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}", aws_sdk_sts::error::DisplayErrorContext(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
