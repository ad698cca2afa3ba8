"""Creates the local S3 store's buckets (deploy/docker-compose.yml, service s3-init): the bucket of
DAGSTER_COMPUTE_LOGS_BUCKET and the one of LENS_DATA_ROOT (s3://bucket/prefix), at DAGSTER_S3_ENDPOINT_URL.
Buckets that exist are left as they are; exits non-zero when the store cannot be reached."""

import os

import boto3
from botocore.exceptions import ClientError


def bucket_names(env) -> list[str]:
    names = [env["DAGSTER_COMPUTE_LOGS_BUCKET"]]
    data_root = env.get("LENS_DATA_ROOT", "")
    if data_root.startswith("s3://"):
        names.append(data_root[len("s3://"):].split("/", 1)[0])
    return sorted(set(names))


def main(env=os.environ) -> None:
    s3 = boto3.client("s3", endpoint_url=env.get("DAGSTER_S3_ENDPOINT_URL") or None,
                      region_name=env.get("AWS_REGION") or "us-east-1")
    for name in bucket_names(env):
        try:
            s3.head_bucket(Bucket=name)
            print(f"bucket {name}: exists")
        except ClientError:
            s3.create_bucket(Bucket=name)
            print(f"bucket {name}: created")


if __name__ == "__main__":
    main()
