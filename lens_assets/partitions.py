"""Partition definitions shared by the assets (docs/design.md: one `survey` partition per survey)."""

import dagster as dg

from lens_assets.science.surveys import SURVEY_NAMES

survey_partitions = dg.StaticPartitionsDefinition(list(SURVEY_NAMES))

# survey drops in the inbox (inbox/<survey>/<drop>/), registered by survey_inbox_sensor
drop_partitions = dg.DynamicPartitionsDefinition(name="drops")

# characters a drop name cannot hold: "|" joins the dimensions of a scoring key ("<drop>|<survey>" would no
# longer split in two); Dagster also reserves ",", "[", "]" in multi-partition dimension keys and "..." and
# control characters in every partition key (ranges, subsets)
_DROP_NAME_FORBIDDEN = ("|", ",", "[", "]", "...", *(chr(c) for c in range(32)), chr(127))


def drop_name_problem(drop: str) -> str | None:
    """Why ``drop`` cannot be a ``drops`` partition key (a sentence), or None when it can."""
    if not drop:
        return "a drop name cannot be empty"
    bad = [c for c in _DROP_NAME_FORBIDDEN if c in drop]
    if bad:
        return f"drop name {drop!r} contains {bad[0]!r}; drop names cannot contain {list(_DROP_NAME_FORBIDDEN[:5])} " \
               "or control characters"
    return None


# scoring: one partition per (drop, survey); a key string reads "<drop>|<survey>"
scoring_partitions = dg.MultiPartitionsDefinition({"drop": drop_partitions, "survey": survey_partitions})


def scoring_key(survey: str, drop: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"drop": drop, "survey": survey})
