"""No silent option: every option of every `prep` command (found by Click introspection) either
is refused in one line where it does not apply or with a value it cannot take (run here,
through the real CLI), or has a test that pins what it changes (named here; the test must exist
and use the option). A new option without a case fails this test."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from teranprep.cli import main

TESTS = Path(__file__).parent


@dataclass(frozen=True)
class Refused:
    """`prep ARGV` exits 2 with one `error:` line containing `says` (the option reached its check)."""
    argv: tuple
    says: str


@dataclass(frozen=True)
class Proven:
    """tests/FILE::NAME exercises the option and asserts what it changes; `via` is the literal
    it uses when it reaches the option through the stage's Python API under another name."""
    file: str
    name: str
    via: str = ""


@dataclass(frozen=True)
class Untested:
    """Known gap, said out loud: why no test here proves this option (keep this list short)."""
    reason: str


R, P = Refused, Proven
EX = ("extract-regions", "images", "features", "--random-weights", "0")
IMP = ("import-features", "bua-npz", "src", "out")
EV = ("eval", "run", "--splits", "splits")
IDX = ("index", "run", "--features", "features", "--out", "index")
SYN = ("make-synthetic", "syn")
SL = ("train-shortlist", "run", "--splits", "splits")

CASES = {
    # storage (URLs): the options of the commands that read or write them
    ("extract-regions", "--storage-options"): R(EX + ("--storage-options", "nope"), "not JSON"),
    ("verify", "--storage-options"): R(("verify", "features", "--storage-options", "[1]"), "must be a JSON object"),
    ("build-splits", "--storage-options"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("build-splits", "--cache-dir"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("train", "--storage-options"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("train", "--cache-dir"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("eval", "--storage-options"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("eval", "--cache-dir"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("index", "--storage-options"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("index", "--cache-dir"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("build-splits", "--cache-gb"): R(("build-splits", "c.csv", "--features", "f", "--out", "o", "--cache-gb", "0"), "must be > 0"),
    ("train", "--cache-gb"): R(("train", "splits", "--out", "o", "--cache-gb", "-1"), "must be > 0"),
    ("eval", "--cache-gb"): R(EV + ("--cache-gb", "0"), "must be > 0"),
    ("index", "--cache-gb"): R(IDX + ("--cache-gb", "0"), "must be > 0"),
    ("search", "--storage-options"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("search", "--cache-dir"): P("test_storage.py", "test_build_splits_train_eval_index_and_search_read_and_write_the_bucket"),
    ("search", "--cache-gb"): R(("search", "index", "a cat", "--cache-gb", "0"), "must be > 0"),
    ("serve", "--storage-options"): R(("serve", "index") + ("--storage-options", "nope"), "not JSON"),
    ("serve", "--cache-dir"): R(("serve", "index") + ("--cache-dir", "/etc/passwd"), "is a file"),
    ("serve", "--cache-gb"): R(("serve", "index") + ("--cache-gb", "0"), "must be > 0"),
    ("train-shortlist", "--storage-options"): R(SL + ("--storage-options", "nope"), "not JSON"),
    ("train-shortlist", "--cache-dir"): R(SL + ("--cache-dir", "/etc/passwd"), "is a file"),
    ("train-shortlist", "--cache-gb"): R(SL + ("--cache-gb", "0"), "must be > 0"),
    ("import-features", "--storage-options"): R(IMP + ("--storage-options", "nope"), "not JSON"),
    ("import-features", "--cache-dir"): R(IMP + ("--cache-dir", "/etc/passwd"), "is a file"),
    ("import-features", "--cache-gb"): R(IMP + ("--cache-gb", "0"), "must be > 0"),
    ("export-features", "--storage-options"): R(("export-features", "features", "--to", "teran", "out") + ("--storage-options", "nope"), "not JSON"),
    ("export-features", "--cache-dir"): R(("export-features", "features", "--to", "teran", "out") + ("--cache-dir", "/etc/passwd"), "is a file"),
    ("export-features", "--cache-gb"): R(("export-features", "features", "--to", "teran", "out") + ("--cache-gb", "0"), "must be > 0"),
    ("show-alignment", "--storage-options"): R(("show-alignment", "run", "a.jpg", "a cat", "--out", "a.png") + ("--storage-options", "nope"), "not JSON"),
    ("show-alignment", "--cache-dir"): R(("show-alignment", "run", "a.jpg", "a cat", "--out", "a.png") + ("--cache-dir", "/etc/passwd"), "is a file"),
    ("show-alignment", "--cache-gb"): R(("show-alignment", "run", "a.jpg", "a cat", "--out", "a.png") + ("--cache-gb", "0"), "must be > 0"),
    # extract-regions
    ("extract-regions", "--model"): R(EX + ("--model", "nope"), "unknown --model 'nope'"),
    ("extract-regions", "--weights"): R(("extract-regions", "images", "features", "--weights", "x.pth",
                                         "--random-weights", "0"), "pass exactly one of --weights PATH and --random-weights SEED"),
    ("extract-regions", "--random-weights"): P("test_devices.py", "test_with_a_scheduler_the_manifest_records_what_the_workers_ran_at"),
    ("extract-regions", "--batch-size"): R(EX + ("--batch-size", "0"), "'--batch-size': 0 is not in the range x>=1"),
    ("extract-regions", "--device"): R(EX + ("--device", "gpu"), "--device gpu: choose auto, cpu, cuda or cuda:N"),
    ("extract-regions", "--shard-size"): R(EX + ("--shard-size", "0"), "--shard-size must be >= 1"),
    ("extract-regions", "--dtype"): P("test_butd_cli.py", "test_full_size_butd_with_random_weights_extracts_end_to_end_in_float16"),
    ("extract-regions", "--precision"): P("test_extract_inputs.py", "test_changed_precision_is_refused_on_resume_without_overwrite"),
    ("extract-regions", "--conf-thresh"): R(EX + ("--conf-thresh", "2"), "--conf-thresh must be within [0, 1]"),
    ("extract-regions", "--min-boxes"): R(EX + ("--min-boxes", "0"), "need 1 <= --min-boxes <= --max-boxes"),
    ("extract-regions", "--max-boxes"): R(EX + ("--min-boxes", "5", "--max-boxes", "4"), "need 1 <= --min-boxes <= --max-boxes"),
    ("extract-regions", "--given-boxes"): P("test_edges.py", "test_given_boxes_report_images_without_boxes_and_unmatched_keys"),
    ("extract-regions", "--box-source"): R(EX + ("--model", "tv-frcnn-mbv3-320", "--box-source", "regressed"),
                                           "--box-source applies to the BUTD models"),
    ("extract-regions", "--missing-given-boxes"): R(EX + ("--missing-given-boxes", "skipped"),
                                                    "--missing-given-boxes applies with --given-boxes only"),
    ("extract-regions", "--backend"): P("test_butd_detectron2.py", "test_extract_regions_with_detectron2_writes_features_verify_accepts"),
    ("extract-regions", "--d2-config"): P("test_edges.py", "test_settings_that_change_numbers_are_fingerprinted_and_inapplicable_options_refused"),
    ("extract-regions", "--limit"): R(EX + ("--limit", "0"), "--limit must be >= 1"),
    ("extract-regions", "--workers"): R(EX + ("--workers", "2", "--scheduler", "tcp://127.0.0.1:9"),
                                        "--workers 2 and --scheduler tcp://127.0.0.1:9 do not combine"),
    ("extract-regions", "--scheduler"): P("test_extract.py", "test_unreachable_scheduler_is_one_clear_error"),
    ("extract-regions", "--threads-per-worker"): P("test_edges.py", "test_settings_that_change_numbers_are_fingerprinted_and_inapplicable_options_refused"),
    ("extract-regions", "--retries"): R(EX + ("--retries", "-1"), "--retries must be >= 0"),
    ("extract-regions", "--max-error-rate"): R(EX + ("--max-error-rate", "2"), "--max-error-rate must be within [0, 1]"),
    ("extract-regions", "--overwrite"): P("test_edges.py", "test_added_images_go_into_new_shards_and_only_those_run"),
    ("extract-regions", "--dry-run"): P("test_edges.py", "test_added_images_go_into_new_shards_and_only_those_run"),
    ("extract-regions", "--spatial"): R(EX + ("--spatial",), "--spatial applies to the VinVL models"),
    ("extract-regions", "--vinvl-selection"): R(EX + ("--vinvl-selection", "max-class"),
                                                "--vinvl-selection applies to the VinVL models"),
    ("extract-regions", "--max-megapixels"): P("test_no_wrong_answer.py", "test_max_megapixels_names_the_limit_and_raising_it_reads_the_image"),
    ("extract-regions", "--verify-inputs"): P("test_no_wrong_answer.py", "test_verify_inputs_reruns_only_the_shard_whose_image_changed_in_place"),
    ("extract-regions", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    # train-detector, show-regions
    ("train-detector", "--config"): P("test_edges.py", "test_wrong_files_as_weights_checkpoints_and_configs_are_one_line"),
    ("train-detector", "--out"): P("test_train_detector.py", "test_validation_map_is_the_ap_of_the_saved_models_detections"),
    ("train-detector", "--epochs"): P("test_train_detector.py", "test_validation_map_is_the_ap_of_the_saved_models_detections", via='"epochs": 3'),
    ("train-detector", "--init-weights"): Untested("fine-tuning from a checkpoint is not exercised by any test yet"),
    ("train-detector", "--overwrite"): Untested("train-detector --overwrite is not exercised by any test yet"),
    ("show-regions", "--out"): P("test_butd_cli.py", "test_show_regions_draws_the_boxes_with_labels"),
    ("show-regions", "--images"): P("test_option_coverage.py", "test_show_regions_options_change_the_picture"),
    ("show-regions", "--labels"): P("test_butd_cli.py", "test_show_regions_draws_the_boxes_with_labels"),
    ("show-regions", "--attr-labels"): P("test_option_coverage.py", "test_show_regions_options_change_the_picture"),
    ("show-regions", "--max-boxes"): P("test_option_coverage.py", "test_show_regions_options_change_the_picture"),
    # build-splits
    ("build-splits", "--features"): P("test_edges.py", "test_build_splits_into_a_features_folder_is_refused_and_touches_nothing"),
    ("build-splits", "--out"): P("test_edges.py", "test_build_splits_into_a_features_folder_is_refused_and_touches_nothing"),
    ("build-splits", "--format"): Untested("the format is detected from the file; no test forces another reader"),
    ("build-splits", "--image-key-template"): P("test_splits.py", "test_image_key_template_maps_karpathy_names_to_feature_keys"),
    ("build-splits", "--image-column"): P("test_splits.py", "test_csv_and_jsonl_with_custom_columns"),
    ("build-splits", "--caption-column"): P("test_splits.py", "test_csv_and_jsonl_with_custom_columns"),
    ("build-splits", "--restval"): P("test_splits.py", "test_restval_goes_where_the_mode_says"),
    ("build-splits", "--val"): P("test_splits.py", "test_seeded_split_is_reproducible_disjoint_and_follows_the_seed"),
    ("build-splits", "--test"): P("test_splits.py", "test_seeded_split_is_reproducible_disjoint_and_follows_the_seed"),
    ("build-splits", "--seed"): P("test_splits.py", "test_seeded_split_is_reproducible_disjoint_and_follows_the_seed"),
    ("build-splits", "--tokenizer"): P("test_splits_tokenize.py", "test_a_local_tokenizer_dir_is_used_and_recorded"),
    ("build-splits", "--max-tokens"): P("test_random_weights_lineage.py", "test_every_stage_after_random_weight_features_warns_and_records_it"),
    ("build-splits", "--max-missing"): P("test_splits.py", "test_cli_reports_one_error_line_and_exit_code_2"),
    ("build-splits", "--overwrite"): P("test_splits.py", "test_changed_parameters_are_refused_unless_overwrite"),
    ("build-splits", "--caption-rule"): P("test_splits_tokenize.py", "test_a_local_tokenizer_dir_is_used_and_recorded"),
    ("build-splits", "--quiet"): P("test_random_weights_lineage.py", "test_every_stage_after_random_weight_features_warns_and_records_it"),
    # train, eval, show-alignment
    ("train", "--config"): P("test_edges.py", "test_wrong_files_as_weights_checkpoints_and_configs_are_one_line"),
    ("train", "--out"): P("test_edges.py", "test_interrupted_training_writes_a_checkpoint_and_resume_continues"),
    ("train", "--resume"): P("test_edges.py", "test_interrupted_training_writes_a_checkpoint_and_resume_continues"),
    ("train", "--features"): P("test_random_weights_lineage.py", "test_every_stage_after_random_weight_features_warns_and_records_it"),
    ("train", "--device"): R(("train", "splits", "--config", "teran_small", "--out", "run", "--device", "gpu"),
                             "--device gpu: choose auto, cpu, cuda or cuda:N"),
    ("train", "--stop-after"): P("test_edges.py", "test_interrupted_training_writes_a_checkpoint_and_resume_continues"),
    ("train", "--precision"): P("test_teran_precision.py", "test_bf16_training_on_planted_signal_reaches_high_recall"),
    ("eval", "--splits"): P("test_teran_train.py", "test_eval_protocols_match_a_pair_by_pair_computation", via="evaluate(run, splits"),
    ("eval", "--split"): Untested("every eval test scores the default test split"),
    ("eval", "--protocol"): P("test_teran_train.py", "test_eval_protocols_match_a_pair_by_pair_computation"),
    ("eval", "--features"): P("test_random_weights_lineage.py", "test_a_run_trained_on_random_weights_warns_when_evaluated_on_other_features"),
    ("eval", "--out"): P("test_teran_precision.py", "test_eval_refuses_drift_without_bf16_and_unknown_precision", via="out"),
    ("eval", "--device"): R(EV + ("--device", "gpu"), "--device gpu: choose auto, cpu, cuda or cuda:N"),
    ("eval", "--batch-size"): Untested("scores do not depend on it by design; no test pins the memory it bounds"),
    ("eval", "--text-encoder"): P("test_teran_reference_import.py", "test_cli_refuses_an_unknown_head_count_then_evaluates_with_text_encoder"),
    ("eval", "--relevance"): R(EV + ("--no-ndcg", "--relevance", "r.npy"), "--no-ndcg: --relevance, --relevance-cache"),
    ("eval", "--relevance-cache"): R(EV + ("--no-ndcg", "--relevance-cache", "cache"), "--no-ndcg: --relevance, --relevance-cache"),
    ("eval", "--no-ndcg"): R(EV + ("--no-ndcg", "--workers", "2"), "--no-ndcg: --relevance, --relevance-cache, --scheduler and --workers"),
    ("eval", "--scheduler"): R(EV + ("--no-ndcg", "--scheduler", "tcp://127.0.0.1:9"), "--no-ndcg: --relevance"),
    ("eval", "--workers"): R(EV + ("--workers", "0", "--scheduler", "tcp://127.0.0.1:9"),
                             "--workers 0 and --scheduler tcp://127.0.0.1:9 do not combine"),
    ("eval", "--json"): P("test_teran_reference_import.py", "test_cli_refuses_an_unknown_head_count_then_evaluates_with_text_encoder"),
    ("eval", "--precision"): P("test_teran_precision.py", "test_eval_refuses_drift_without_bf16_and_unknown_precision"),
    ("eval", "--drift"): R(EV + ("--drift",), "--drift compares bf16 scores with fp32 ones; it needs --precision bf16"),
    ("show-alignment", "--out"): P("test_teran_learning.py", "test_planted_signal_reaches_high_recall_on_held_out_images"),
    ("show-alignment", "--splits"): P("test_teran_learning.py", "test_planted_signal_reaches_high_recall_on_held_out_images"),
    ("show-alignment", "--features"): Untested("show-alignment is tested with --splits only"),
    ("show-alignment", "--images"): P("test_teran_learning.py", "test_planted_signal_reaches_high_recall_on_held_out_images"),
    ("show-alignment", "--tokenizer"): P("test_teran_learning.py", "test_planted_signal_reaches_high_recall_on_held_out_images"),
    ("show-alignment", "--text-encoder"): P("test_teran_reference_import.py", "test_text_encoder_option_supplies_a_config_the_checkpoint_cannot"),
    # import-features, export-features
    ("import-features", "--key-map"): P("test_formats_import.py", "test_key_map_names_images_and_unmapped_ids_are_error_rows"),
    ("import-features", "--shard-size"): R(IMP + ("--shard-size", "0"), "--shard-size must be >= 1"),
    ("import-features", "--dtype"): Untested("imports are tested at the default float32 only"),
    ("import-features", "--sizes"): R(IMP + ("--sizes", "sizes.csv"), "--sizes applies to the teran format only"),
    ("import-features", "--split"): R(IMP + ("--split", "train"), "--split applies to scan-precomp only"),
    ("import-features", "--max-error-rate"): R(IMP + ("--max-error-rate", "2"), "--max-error-rate must be within [0, 1]"),
    ("import-features", "--overwrite"): P("test_sharded.py", "test_import_overwrite_replans_in_key_order"),
    ("import-features", "--dry-run"): P("test_sharded.py", "test_dry_run_on_a_fresh_folder_writes_nothing"),
    ("import-features", "--quiet"): P("test_formats_import.py", "test_other_parameters_are_refused_unless_overwrite"),
    ("export-features", "--to"): P("test_formats_roundtrip.py", "test_scan_export_with_splits_writes_five_captions_per_image_in_image_order"),
    ("export-features", "--splits"): P("test_formats_roundtrip.py", "test_splits_option_with_a_non_scan_format_is_refused"),
    ("export-features", "--key-map"): Untested("export with a key map is not exercised by any test yet"),
    ("export-features", "--label-map"): R(("export-features", "features", "--to", "scan-precomp", "out",
                                           "--label-map", "m.json"), "--label-map applies to --to vinvl-tsv only"),
    ("export-features", "--quiet"): P("test_formats_roundtrip.py", "test_scan_export_with_splits_writes_five_captions_per_image_in_image_order"),
    # make-synthetic, demo
    ("make-synthetic", "--images"): R(SYN + ("--images", "0"), "--images must be >= 1"),
    ("make-synthetic", "--seed"): P("test_synthetic.py", "test_same_seed_gives_identical_files_and_another_seed_does_not"),
    ("make-synthetic", "--size"): R(SYN + ("--size", "10"), "--size must be >= 48 pixels"),
    ("make-synthetic", "--captions-per-image"): R(SYN + ("--captions-per-image", "0"), "--captions-per-image must be >= 1"),
    ("make-synthetic", "--val"): R(SYN + ("--images", "4", "--val", "9"), "--val and --test must be >= 0"),
    ("make-synthetic", "--test"): R(SYN + ("--images", "4", "--test", "9"), "--val and --test must be >= 0"),
    ("make-synthetic", "--twin-rate"): R(SYN + ("--twin-rate", "2"), "--twin-rate must be within [0, 1]"),
    ("make-synthetic", "--image-format"): P("test_synthetic.py", "test_same_seed_gives_identical_files_and_another_seed_does_not"),
    ("make-synthetic", "--overwrite"): P("test_synthetic.py", "test_rerun_is_a_noop_and_other_parameters_need_overwrite"),
    ("demo", "--out"): P("test_demo.py", "test_quick_demo_runs_every_stage_and_reaches_its_bar"),
    ("demo", "--images"): R(("demo", "--out", "d", "--images", "0"), "--images must be >= 1"),
    ("demo", "--quick"): P("test_demo.py", "test_quick_demo_runs_every_stage_and_reaches_its_bar"),
    ("demo", "--seed"): Untested("the quick demo runs at its default seed only (minutes per run)"),
    # index, train-shortlist, search, serve
    ("index", "--features"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("index", "--out"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("index", "--splits"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("index", "--split"): R(IDX + ("--split", "test"), "--split needs --splits"),
    ("index", "--captions"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("index", "--head"): P("test_search.py", "test_shortlist_head_beats_an_untrained_projection"),
    ("index", "--dtype"): P("test_search.py", "test_exhaustive_search_is_evals_ranking"),
    ("index", "--shard-size"): R(IDX + ("--shard-size", "0"), "--shard-size must be >= 1"),
    ("index", "--batch-size"): R(IDX + ("--batch-size", "0"), "'--batch-size': 0 is not in the range x>=1"),
    ("index", "--workers"): R(IDX + ("--workers", "1", "--scheduler", "tcp://127.0.0.1:9"),
                              "--workers 1 and --scheduler tcp://127.0.0.1:9 do not combine"),
    ("index", "--scheduler"): P("test_devices.py", "test_workers_with_scheduler_is_refused_in_one_line"),
    ("index", "--device"): R(IDX + ("--device", "gpu"), "--device gpu: choose auto, cpu, cuda or cuda:N"),
    ("index", "--threads"): R(IDX + ("--threads", "0"), "--threads must be >= 1"),
    ("index", "--exact-max"): R(IDX + ("--exact-max", "0"), "--exact-max must be >= 1"),
    ("index", "--overwrite"): Untested("index --overwrite is not exercised by any test yet"),
    ("index", "--dry-run"): P("test_sharded.py", "test_dry_run_report_has_the_same_shape_for_extract_import_and_index"),
    ("train-shortlist", "--splits"): P("test_search.py", "test_shortlist_head_beats_an_untrained_projection"),
    ("train-shortlist", "--features"): Untested("the shortlist tests read the features through the splits' lineage"),
    ("train-shortlist", "--out"): P("test_search.py", "test_shortlist_head_beats_an_untrained_projection"),
    ("train-shortlist", "--dim"): R(SL + ("--dim", "0"), "--dim must be >= 1"),
    ("train-shortlist", "--epochs"): R(SL + ("--epochs", "0"), "--epochs must be >= 1"),
    ("train-shortlist", "--batch-size"): R(SL + ("--batch-size", "1"), "--batch-size must be >= 2"),
    ("train-shortlist", "--lr"): R(SL + ("--lr", "0"), "--lr must be > 0"),
    ("train-shortlist", "--max-images"): R(SL + ("--max-images", "1"), "--max-images must be >= 2"),
    ("train-shortlist", "--seed"): Untested("the shortlist test trains at the default seed only"),
    ("train-shortlist", "--overwrite"): Untested("train-shortlist --overwrite is not exercised by any test yet"),
    ("search", "-k"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("search", "--shortlist"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("search", "--exhaustive"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("search", "--image"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("search", "--tokenizer"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    ("search", "--json"): P("test_search.py", "test_cli_search_image_to_text_and_errors"),
    # --quiet of the stages that gained it with issue 19, verify's --full
    ("eval", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_train_and_eval_print_only_their_summary_line"),
    ("train", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_train_and_eval_print_only_their_summary_line"),
    ("index", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    ("make-synthetic", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    ("train-detector", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    ("train-shortlist", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    ("verify", "--quiet"): P("test_no_wrong_answer.py", "test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage"),
    ("verify", "--full"): P("test_no_wrong_answer.py", "test_nan_chain_is_refused_at_the_first_stage_that_sees_it"),
    ("demo", "--min-r1"): P("test_demo.py", "test_quick_demo_runs_every_stage_and_reaches_its_bar"),
    ("demo", "--min-map"): P("test_demo.py", "test_quick_demo_runs_every_stage_and_reaches_its_bar"),
    ("serve", "--host"): Untested("the server test binds 127.0.0.1 (the default); no second interface here"),
    ("serve", "--port"): P("test_serve.py", "_start_server"),
    ("serve", "--images"): P("test_serve.py", "_start_server"),
    ("serve", "--tokenizer"): P("test_serve.py", "_start_server"),
}


def every_option():
    """(command name, the option's flag as the table writes it) for every command's options."""
    def walk(cmd, name):
        if isinstance(cmd, click.Group):
            for sub_name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, sub_name)
            return
        for param in cmd.params:
            if isinstance(param, click.Option) and not param.hidden:
                long = [o for o in param.opts if o.startswith("--")]
                yield name, (long[0] if long else param.opts[0]), param
    yield from walk(main, "")


def test_every_option_of_every_command_has_a_case():
    options = {(cmd, flag) for cmd, flag, _ in every_option()}
    missing = sorted(options - set(CASES))
    assert not missing, f"options without a case (add one to CASES): {missing}"
    assert not sorted(set(CASES) - options), "cases of options that no longer exist"


def _function_source(file: str, name: str) -> str | None:
    source = (TESTS / file).read_text("utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    return None


PROVEN = sorted((k, v) for k, v in CASES.items() if isinstance(v, Proven))
REFUSED = sorted((k, v) for k, v in CASES.items() if isinstance(v, Refused))


@pytest.mark.parametrize("option,case", PROVEN, ids=[f"{c} {o}" for (c, o), _ in PROVEN])
def test_the_named_test_exists_and_uses_the_option(option, case):
    command, flag = option
    param = next(p for c, f, p in every_option() if (c, f) == option)
    source = _function_source(case.file, case.name)
    assert source is not None, f"{case.file}::{case.name} does not exist"
    if case.via:
        assert case.via in source, f"{case.file}::{case.name} does not contain {case.via!r}"
        return
    used = any(o in source for o in param.opts) or f"{param.name}=" in source
    assert used, f"{case.file}::{case.name} never passes {flag} (or {param.name}=)"


@pytest.mark.parametrize("option,case", REFUSED, ids=[f"{c} {o}" for (c, o), _ in REFUSED])
def test_the_option_is_refused_in_one_line(option, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command, flag = option
    assert case.argv[0] == command and any(a == flag for a in case.argv), "the case must use its option"
    result = CliRunner().invoke(main, list(case.argv))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output[-1500:])
    assert lines and lines[-1].startswith("error: ") and case.says in lines[-1], result.output[-1500:]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_untested_options_stay_few():
    gaps = sorted(k for k, v in CASES.items() if isinstance(v, Untested))
    assert len(gaps) <= 14, gaps  # a ratchet: lower it when a gap gets its test


def test_show_regions_options_change_the_picture(tmp_path):
    """--max-boxes, --attr-labels and --images each change the PNG show-regions draws."""
    import numpy as np
    from PIL import Image
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions
    rng = np.random.default_rng(0)
    boxes = np.array([[2, 2, 30, 30], [20, 10, 60, 50], [40, 30, 70, 60]], np.float32)
    regions = Regions("a.png", 80, 64, boxes, rng.standard_normal((3, 4)).astype(np.float32),
                      class_ids=np.array([0, 1, 0]), class_scores=np.full(3, 0.9, np.float32),
                      attr_ids=np.array([1, 0, 1]), attr_scores=np.full(3, 0.8, np.float32))
    features = tmp_path / "features"
    write_features(features, [regions], feature_dim=4)
    images, other = tmp_path / "images", tmp_path / "other"
    for root in (images, other):
        root.mkdir()
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(root / "a.png")
    (tmp_path / "attrs.txt").write_text("red\nround\n")

    def picture(*extra):
        out = tmp_path / f"png{len(list(tmp_path.glob('png*')))}"
        extra = extra if "--images" in extra else ("--images", str(images), *extra)
        res = CliRunner().invoke(main, ["show-regions", str(features), "a.png", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        return b"".join(p.read_bytes() for p in sorted(out.glob("*.png")))

    base = picture()
    assert picture("--max-boxes", "1") != base
    assert picture("--attr-labels", str(tmp_path / "attrs.txt")) != base
    assert picture("--images", str(other)) != base
    assert picture() == base  # the same options draw the same bytes
