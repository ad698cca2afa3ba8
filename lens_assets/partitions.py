"""Partition definitions shared by the assets (DESIGN.md: one `survey` partition per survey)."""

import dagster as dg

from lens_assets.science.surveys import SURVEY_NAMES

survey_partitions = dg.StaticPartitionsDefinition(list(SURVEY_NAMES))

# survey drops in the inbox (inbox/<survey>/<drop>/), registered by survey_inbox_sensor
drop_partitions = dg.DynamicPartitionsDefinition(name="drops")

# scoring: one partition per (drop, survey); a key string reads "<drop>|<survey>"
scoring_partitions = dg.MultiPartitionsDefinition({"drop": drop_partitions, "survey": survey_partitions})


def scoring_key(survey: str, drop: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"drop": drop, "survey": survey})
