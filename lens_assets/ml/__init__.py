"""ML layer: timm backbones, shard datasets and (later) Lightning training. Never imports dagster."""
