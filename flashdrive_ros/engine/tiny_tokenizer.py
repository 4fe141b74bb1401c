"""Deterministic small tokenizer for the tiny preset.

Layout (docs/DESIGN.md "Tiny vocabulary layout"), the real Qwen3-VL layout scaled down:
  0 .. 1016      byte-level BPE (256 byte symbols + 761 merges) trained on a fixed built-in corpus
  1017 .. 1023   the Qwen special tokens (QWEN_TOKENS order)       -> base vocabulary of exactly 1024
  1024 .. 5023   <i0> .. <i3999>                                   (traj_token_start_idx = 1024)
  5024 .. 5051   the 28 Alpamayo specials (tokens.SPECIAL_TOKEN_NAMES order)  -> vocab 5052

Pre-tokenization follows Qwen (regex split, digits one by one, then byte-level), so the prompt text
splits the same way as with the real tokenizer, and any string round-trips through decode.
The corpus is driving reasoning so that generated reasoning decodes to readable words.

CLI: python -m flashdrive_ros.engine.tiny_tokenizer OUTDIR   (writes tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja)
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from flashdrive_ros.engine.prompt import CAMERA_LABELS, INSTRUCTION, SYSTEM_PROMPT
from flashdrive_ros.engine.tokens import QWEN_TOKENS, SPECIAL_TOKEN_NAMES, special_token, traj_token

BASE_VOCAB_SIZE = 1024
TRAJ_VOCAB_SIZE = 4000
TINY_VOCAB_SIZE = BASE_VOCAB_SIZE + TRAJ_VOCAB_SIZE + len(SPECIAL_TOKEN_NAMES)  # 5052

# Qwen2/Qwen3 pre-tokenizer pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3-VL style chat template restricted to what the driving prompt uses: system/user/assistant
# turns whose content is a string or a list of {"type": "text"|"image"} parts. prompt.py renders the
# same string with its own code (tested), this copy lets `apply_chat_template` work too.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# ---------------------------------------------------------------- corpus
_ACTIONS = [
    "Decelerate", "Accelerate", "Stop", "Keep lane", "Keep the lane", "Maintain speed", "Slow down",
    "Speed up", "Yield", "Proceed", "Creep forward", "Change lane to the left", "Change lane to the right",
    "Turn left", "Turn right", "Go straight", "Continue straight", "Nudge to the left", "Nudge to the right",
    "Follow the lead vehicle", "Stay behind the truck", "Come to a stop", "Remain stopped", "Start moving",
    "Brake gently", "Brake hard", "Merge into the left lane", "Merge into the right lane",
    "Make a U-turn", "Pull over", "Resume driving", "Keep distance",
]
_REASONS = [
    "since the lead vehicle ahead is braking",
    "because the traffic light is red",
    "because the traffic light turned yellow",
    "as the light turned green",
    "since the light is green and the intersection is clear",
    "to yield to the pedestrian crossing the road",
    "because a pedestrian is waiting at the crosswalk",
    "since a cyclist is riding in the bike lane",
    "to keep a safe distance from the car in front",
    "because the road curves to the left",
    "because the road curves to the right",
    "to follow the curve of the road",
    "since there is a stop sign ahead",
    "to prepare for the right turn at the intersection",
    "to prepare for the left turn at the next junction",
    "because the lane ahead is blocked by a parked car",
    "to pass the slow truck",
    "since the speed limit increased",
    "since the speed limit is lower in the school zone",
    "because of construction cones in the lane",
    "to yield to oncoming traffic",
    "to yield to the cross-traffic vehicle",
    "since the vehicle ahead is accelerating",
    "because the road is clear",
    "because traffic is moving slowly",
    "to keep the lane in heavy traffic",
    "as the gap in the adjacent lane is large enough",
    "since an emergency vehicle is approaching from behind",
    "because a car is cutting in from the right",
    "because a bus is stopping at the bus stop",
    "to avoid the obstacle on the road",
    "to go around the double-parked vehicle",
    "since the route turns left at the roundabout",
    "to take the exit on the right",
    "because the highway on-ramp merges from the right",
    "since the railway crossing gate is closing",
    "because it is raining and the road is wet",
    "since visibility is low at night",
]
_OBJECTS = [
    "vehicle", "car", "truck", "bus", "motorcycle", "bicycle", "cyclist", "pedestrian", "child", "dog",
    "traffic light", "stop sign", "yield sign", "speed bump", "crosswalk", "intersection", "roundabout",
    "lane marking", "curb", "barrier", "cone", "parked car", "lead vehicle", "oncoming car", "ego vehicle",
]
# Extra driving words so that merges cover a broad reasoning vocabulary.
_LEXICON = """
ahead behind beside left right front rear side center middle near far close distant approaching leaving
lane lanes road street avenue highway freeway ramp exit entrance junction fork shoulder median sidewalk
parking lot driveway alley bridge tunnel overpass underpass toll booth gate tracks railway tram
signal signals light lights red yellow amber green flashing arrow sign signs marking markings stripe
solid dashed double white line lines boundary crossing zebra zone school work construction detour
speed limit slow fast faster slower steady smooth gentle sharp gradual sudden quick quickly safely
safe unsafe hazard danger risk collision conflict clearance gap space distance margin buffer
accelerating decelerating braking stopping stopped waiting turning merging passing overtaking
yielding following leading reversing backing parked parking moving crossing entering exiting
driver drivers vehicles cars trucks buses vans pickup trailer tractor ambulance police fire engine
scooter skateboard wheelchair stroller animal deer pedestrians cyclists motorcyclist jaywalking
weather rain snow fog ice wet dry sunny dark night day dusk dawn glare shadow visibility
curve curves curved bend bends winding straight uphill downhill slope hill crest dip bump pothole
narrow wide merge merges splits ends begins blocked open closed occupied empty clear busy congested
queue jam traffic flow cruise reduce increase maintain keep hold wait check monitor watch observe
because since therefore so while until before after when then also still again already
first second third next last other another both each every all some no not none
is are was were be been being has have had will would should must can may might
the a an of to in on at by for with from into onto over under through across along around
it its they their them he she his her this that these those there here
meters seconds minutes hours mph kph km m s one two three four five ten twenty thirty fifty hundred
"""

_NAVIGATION = [
    "Turn left in 50 m.", "Turn right in 100 m.", "Continue straight for 200 m.",
    "Take the second exit at the roundabout.", "Keep left at the fork.", "Keep right at the fork.",
    "Make a U-turn at the next intersection.", "Merge onto the highway.", "Take the exit in 400 m.",
    "Arrive at the destination on the right.",
]


def training_corpus() -> list[str]:
    """The fixed corpus (a list of lines; deterministic)."""
    # The fixed prompt text is repeated so that it becomes a few whole-word tokens.
    fixed = [SYSTEM_PROMPT, INSTRUCTION, "system\n", "user\n", "assistant\n"]
    fixed += [" ".join(f"{label}: frame {k}" for k in range(4)) + " " for label in CAMERA_LABELS.values()]
    lines = fixed * 50
    for action, reason in itertools.product(_ACTIONS, _REASONS):
        lines.append(f"{action} {reason}.")
    for first, second in zip(_ACTIONS, _ACTIONS[1:] + _ACTIONS[:1]):
        for reason in _REASONS[::5]:
            lines.append(f"{first}, then {second.lower()} {reason}.")
    lines.extend(" ".join(_LEXICON.split()[k:k + 12]) for k in range(0, len(_LEXICON.split()), 12))
    lines.extend(word.capitalize() for word in _LEXICON.split())
    for obj in _OBJECTS:
        lines.append(f"The {obj} ahead is moving. A {obj} is on the left. The {obj} stopped on the right.")
    lines.extend(_NAVIGATION)
    lines.extend(f"{n} m ahead, {n} km/h, {n}.{n} s" for n in range(100))
    return lines


# ---------------------------------------------------------------- building
def build_base_tokenizer() -> Tokenizer:
    """The 1024-token base vocabulary alone (BPE + Qwen specials), like a plain Qwen tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    n_bpe = BASE_VOCAB_SIZE - len(QWEN_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, min_frequency=1, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != n_bpe:
        raise RuntimeError(
            f"BPE training produced {tokenizer.get_vocab_size()} tokens, expected {n_bpe}: corpus too small"
        )
    tokenizer.add_special_tokens(list(QWEN_TOKENS))
    return tokenizer


def build_tiny_tokenizer() -> Tokenizer:
    """Base vocabulary + <i0>..<i3999> + the 28 Alpamayo specials. Same result every call."""
    tokenizer = build_base_tokenizer()
    # Trajectory bins are plain added tokens, the 28 are special (as the reference adds them).
    tokenizer.add_tokens([traj_token(k) for k in range(TRAJ_VOCAB_SIZE)])
    tokenizer.add_special_tokens([special_token(n) for n in SPECIAL_TOKEN_NAMES])
    if tokenizer.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny vocabulary has {tokenizer.get_vocab_size()} tokens, expected {TINY_VOCAB_SIZE}")
    return tokenizer


def tokenizer_config() -> dict:
    """tokenizer_config.json contents (loaded by transformers' AutoTokenizer)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }


def save_tiny_tokenizer(outdir: str | Path) -> Path:
    """Write the tokenizer files into outdir (created if needed). Returns outdir."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    (outdir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    (outdir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (outdir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (outdir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return outdir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="directory to write the tokenizer files into")
    args = parser.parse_args(argv)
    out = save_tiny_tokenizer(args.outdir)
    print(f"wrote tiny tokenizer ({TINY_VOCAB_SIZE} tokens) to {out}")


if __name__ == "__main__":
    main()
