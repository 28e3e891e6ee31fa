"""Four short preference pairs and TRL's ORPO metric names, shared by the parity tests."""

ROWS = [
    {"prompt": "name a fruit:", "chosen": " apple banana", "rejected": " dog cat"},
    {"prompt": "name an animal please:", "chosen": " dog", "rejected": " apple pear plum"},
    {"prompt": "hi", "chosen": " hello there friend", "rejected": " go away"},
    {"prompt": "count to three:", "chosen": " one two three", "rejected": " three"},
]
METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
]
