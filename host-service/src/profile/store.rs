//! The profiles' bucket on S3 (aws-sdk-s3; moto's S3 in every test). Objects stream between S3
//! and files: a download is written to a file as it arrives, an upload is read from one, so no
//! profile is ever whole in memory.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Region, timeout::TimeoutConfig};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use tokio::io::AsyncWriteExt as _;

/// The original's archive name, last part of every key.
pub const ARCHIVE_NAME: &str = "fractal-app-config.tar.lz4.enc";
/// Connecting to S3 is fast or failing; a slow connect is a dead endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request's attempt, upload and download of a large profile included (100 MiB at a slow
/// 10 MiB/s).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("S3 {operation} {key}: {message}")]
    S3 {
        operation: &'static str,
        key: String,
        message: String,
    },
    #[error("S3 object {key} is {size} bytes, more than the limit of {limit}")]
    TooLarge { key: String, size: u64, limit: u64 },
    #[error("{action} {key}: {source}")]
    Io {
        action: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where and how to reach the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub bucket: String,
    /// The original's client region, `us-east-1`.
    pub region: String,
    /// An S3 endpoint other than AWS's (moto); addressed path-style.
    pub endpoint: Option<String>,
}

/// The bucket.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    bucket: String,
}

impl Store {
    /// A client with the SDK's default credential chain (the instance profile on EC2).
    pub async fn connect(config: &StoreConfig) -> Self {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .timeout_config(timeouts);
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
        if config.endpoint.is_some() || shared.endpoint_url().is_some() {
            // moto (and most S3 stand-ins) serve buckets as paths, not host names.
            s3 = s3.force_path_style(true);
        }
        Self::from_client(Client::from_conf(s3.build()), &config.bucket)
    }

    pub fn from_client(client: Client, bucket: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_owned(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The most recently modified key under `prefix` that names an archive (the original's
    /// prediction), listing every page.
    pub async fn newest_archive(&self, prefix: &str) -> Result<Option<String>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{prefix}/"))
            .into_paginator()
            .send();
        let mut newest: Option<(SystemTime, String)> = None;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_error("ListObjectsV2", prefix, e))?;
            for object in page.contents() {
                let (Some(key), Some(modified)) = (object.key(), object.last_modified()) else {
                    continue;
                };
                if !key.ends_with(ARCHIVE_NAME) {
                    continue;
                }
                let modified = SystemTime::try_from(*modified).unwrap_or(SystemTime::UNIX_EPOCH);
                if newest.as_ref().is_none_or(|(at, _)| modified > *at) {
                    newest = Some((modified, key.to_owned()));
                }
            }
        }
        Ok(newest.map(|(_, key)| key))
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
            Err(error) => Err(s3_error("HeadObject", key, error)),
        }
    }

    /// Streams `key` into `file` (positioned at its start), at most `limit` bytes; returns the
    /// object's length. `None` when there is no such key.
    pub async fn download(
        &self,
        key: &str,
        file: &mut tokio::fs::File,
        limit: u64,
    ) -> Result<Option<u64>, StoreError> {
        let object = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(object) => object,
            Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                return Ok(None);
            }
            Err(error) => return Err(s3_error("GetObject", key, error)),
        };
        let too_large = |size| StoreError::TooLarge {
            key: key.to_owned(),
            size,
            limit,
        };
        let announced = object.content_length().map_or(0, |n| n.max(0) as u64);
        if announced > limit {
            return Err(too_large(announced));
        }
        let mut body = object.body;
        let mut written = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::Io {
            action: "read the body of",
            key: key.to_owned(),
            source: std::io::Error::other(e),
        })? {
            written += chunk.len() as u64;
            if written > limit {
                return Err(too_large(written));
            }
            file.write_all(&chunk)
                .await
                .map_err(|source| StoreError::Io {
                    action: "write the download of",
                    key: key.to_owned(),
                    source,
                })?;
        }
        file.flush().await.map_err(|source| StoreError::Io {
            action: "write the download of",
            key: key.to_owned(),
            source,
        })?;
        Ok(Some(written))
    }

    /// Uploads `len` bytes of `file` (from its start) to `key`; returns the version id S3 gave
    /// the object (`None` on an unversioned bucket: logged, not fatal).
    pub async fn upload(
        &self,
        key: &str,
        file: tokio::fs::File,
        len: u64,
    ) -> Result<Option<String>, StoreError> {
        let body = ByteStream::read_from()
            .file(file)
            .length(aws_sdk_s3::primitives::Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Io {
                action: "read the archive for",
                key: key.to_owned(),
                source: std::io::Error::other(e),
            })?;
        let output = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(body)
            .send()
            .await
            .map_err(|e| s3_error("PutObject", key, e))?;
        Ok(output.version_id().map(str::to_owned))
    }
}

fn s3_error<E>(operation: &'static str, key: &str, error: E) -> StoreError
where
    E: std::error::Error,
{
    StoreError::S3 {
        operation,
        key: key.to_owned(),
        message: DisplayErrorContext(&error).to_string(),
    }
}
