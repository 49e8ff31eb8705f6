//! The S3 client: [`S3Options`] (endpoint, region, credentials, timeouts, the SDK's own
//! retries), [`parse_s3_uri`], [`client`], and the sorting of SDK errors into transient and
//! permanent [`StoreError`]s (with a hint about credentials) that every S3 call uses.
//! Imports: the crate root ([`StoreError`]) only; the other `s3` files import this one.

use crate::StoreError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::Client;
use std::time::Duration;

/// How to reach the S3 service. Everything left `None` comes from the AWS
/// environment (`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...).
#[derive(Debug, Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix below which the store lives (no leading or trailing `/`
    /// needed).
    pub prefix: String,
    /// For S3-compatible services, e.g. `http://127.0.0.1:3900`.
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    /// `http://host/bucket/key` instead of `http://bucket.host/key`; most
    /// S3-compatible services need it.
    pub force_path_style: bool,
    /// Static access key and secret, instead of the credential chain.
    pub credentials: Option<(String, String)>,
    /// Attempts per request, including the first (the SDK retries transient
    /// errors with backoff).
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// `ListObjectsV2` page size (1000 is the S3 maximum).
    pub page_size: i32,
}

impl S3Options {
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        S3Options {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint_url: None,
            region: None,
            force_path_style: false,
            credentials: None,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(60),
            page_size: 1000,
        }
    }

    /// Options for `s3://bucket/prefix`, the rest default.
    pub fn from_uri(uri: &str) -> Result<Self, StoreError> {
        let (bucket, prefix) = parse_s3_uri(uri)?;
        Ok(S3Options::new(bucket, prefix))
    }
}

/// Splits `s3://bucket/some/prefix` into `("bucket", "some/prefix")`. The
/// prefix keeps a trailing `/` when the URI has one.
pub fn parse_s3_uri(uri: &str) -> Result<(String, String), StoreError> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::Permanent(format!("{uri}: not an s3:// URI")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(StoreError::Permanent(format!(
            "{uri}: no bucket name (expected s3://bucket/prefix)"
        )));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Builds an S3 client from the options and the AWS environment.
pub async fn client(opts: &S3Options) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(opts.connect_timeout)
                .read_timeout(opts.read_timeout)
                .build(),
        )
        .retry_config(
            aws_config::retry::RetryConfig::standard().with_max_attempts(opts.max_attempts.max(1)),
        );
    if let Some(r) = &opts.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &opts.endpoint_url {
        loader = loader.endpoint_url(e.clone());
    }
    if let Some((ak, sk)) = &opts.credentials {
        loader = loader.credentials_provider(Credentials::new(
            ak.clone(),
            sk.clone(),
            None,
            None,
            "quire-static",
        ));
    }
    let shared = loader.load().await;
    let mut conf =
        aws_sdk_s3::config::Builder::from(&shared).force_path_style(opts.force_path_style);
    if shared.region().is_none() {
        // S3-compatible services rarely care; AWS redirects to the right one.
        conf = conf.region(Region::new("us-east-1"));
    }
    Client::from_conf(conf.build())
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    match e {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            e.raw_response().map(|r| r.status().as_u16())
        }
        _ => None,
    }
}

pub(super) fn is_status<E>(e: &SdkError<E, HttpResponse>, code: u16) -> bool {
    status(e) == Some(code)
}

/// Sorts an SDK error into transient and permanent.
pub(super) fn classify<E>(what: &str, e: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &e {
        // No credentials to sign with (none configured, or the instance metadata service
        // refuses): waiting does not bring them, and a user must hear it at once.
        SdkError::DispatchFailure(_)
            if DisplayErrorContext(&e).to_string().contains("error occurred while loading credentials") =>
        {
            false
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            let code = e.code().unwrap_or("");
            matches!(
                code,
                "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeout"
                    | "InternalError"
                    | "ServiceUnavailable"
            ) || status(&e).is_some_and(|s| s >= 500 || s == 429 || s == 408)
        }
        // ConstructionFailure (e.g. no credentials found) and the rest.
        _ => false,
    };
    let mut msg = format!("{what}: {}", DisplayErrorContext(&e));
    if !transient
        && (msg.contains("credentials")
            || msg.contains("InvalidAccessKeyId")
            || msg.contains("AccessDenied"))
    {
        msg.push_str(
            " (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the pod's IAM role)",
        );
    }
    if transient {
        StoreError::Transient(msg)
    } else {
        StoreError::Permanent(msg)
    }
}
