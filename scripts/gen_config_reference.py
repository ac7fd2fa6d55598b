"""Write docs/config.md: every key of the experiment config, its default and its meaning.

    .venv/bin/python scripts/gen_config_reference.py [--check] [--conf DIR] [--out FILE]

The meanings are the YAML comments in conf/ (a key's own trailing comment, or the comment block
right above it); the defaults are what Hydra composes for each group option, so the reference
cannot drift from the config: edit a comment in conf/, run this again, commit both. `--check`
writes nothing and exits 1 when the committed reference differs from what conf/ says
(tests/unit/test_config_reference.py runs the same comparison).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "config.md"
GENERATOR = "scripts/gen_config_reference.py"
# Hydra's own settings and the defaults list are not experiment keys
SKIPPED_TOP_LEVEL = ("defaults", "hydra")
_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w-]*)\s*:(?=\s|$)(?P<rest>.*)$")


@dataclass(frozen=True)
class Note:
    """What the comments say about one key: ``text``, or the key whose shared block covers it."""

    text: str = ""
    shared_with: str | None = None


@dataclass
class ConfFile:
    """One YAML file of conf/: its header, each key's note (full dotted paths) and raw values."""

    header: str
    notes: dict[str, Note]
    values: dict[str, Any]
    defaults: list[Any]
    global_package: bool


@dataclass
class Group:
    """A config group (a folder of conf/): its options, default and composed section values."""

    name: str
    default: str | None
    options: dict[str, ConfFile]
    section: dict[str, dict[str, Any]] = field(default_factory=dict)  # option -> composed section


@dataclass
class Reference:
    """Everything docs/config.md says."""

    top: ConfFile
    top_values: dict[str, Any]
    groups: list[Group]
    fields: dict[str, dict[str, Any]]  # section -> dataclass field -> default (sections with a dataclass)


def split_comment(text: str) -> tuple[str, str]:
    """Split one YAML line's ``text`` into its value and its trailing comment (a ``#`` after a
    space, outside quotes), both stripped."""
    quote = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t"):
            return text[:index].strip(), text[index + 1 :].strip()
        index += 1
    return text.strip(), ""


def comment_text(lines: list[str]) -> str:
    """A comment block as one paragraph; a line that is a `fedllm ...` command becomes code."""
    parts = []
    for line in lines:
        text = line.strip()
        parts.append(f"`{text}`" if text.startswith("fedllm ") else text)
    return " ".join(part for part in parts if part)


def parse_conf_file(path: Path, package: str) -> ConfFile:
    """The header, notes and raw values of one conf/ file.

    Comment rules: the comments opening the file (up to the first blank line or key) describe
    the file; a key's trailing comment describes that key; a comment block right above a key
    (no blank line between) describes it, and the keys after it up to the next comment or
    blank line that have no trailing comment of their own share it.

    Args:
        path: the YAML file.
        package: the key prefix its keys get (the group name; "" for conf/config.yaml and
            ``# @package _global_`` files, whose keys are already full paths).
    """
    import yaml

    text = path.read_text()
    global_package = bool(re.search(r"^#\s*@package\s+_global_\s*$", text, flags=re.M))
    prefix = "" if global_package or not package else f"{package}."
    header: list[str] = []
    block: list[str] = []
    block_owner: str | None = None
    notes: dict[str, Note] = {}
    stack: list[tuple[int, str]] = []
    in_header, skipping = True, None  # skipping: indent of a skipped mapping (defaults, hydra)
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            in_header = False
            block, block_owner = [], None
            continue
        if stripped.startswith("#"):
            if re.match(r"#\s*@package", stripped):
                continue
            comment = stripped[1:]
            if in_header:
                header.append(comment)
            else:
                if block_owner is not None:  # a new block starts after keys
                    block, block_owner = [], None
                block.append(comment)
            continue
        in_header = False
        match = _KEY.match(line)
        if match is None:  # a list item or a continuation line
            continue
        indent = len(match["indent"])
        if skipping is not None and indent > skipping:
            continue
        skipping = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, trailing = split_comment(match["rest"])
        key = ".".join([*(name for _, name in stack), match["key"]])
        if not stack and key in SKIPPED_TOP_LEVEL:
            skipping, block, block_owner = indent, [], None
            continue
        if value == "":  # a nested mapping follows
            stack.append((indent, match["key"]))
            block, block_owner = [], None
            continue
        full = prefix + key
        if block and block_owner is None:
            block_owner = full
            # the key's own comment first, then the block's context
            own = comment_text([trailing]).rstrip(".")
            notes[full] = Note(f"{own}. {comment_text(block)}" if own else comment_text(block))
        elif block and not trailing:
            notes[full] = Note(shared_with=block_owner)
        else:
            notes[full] = Note(comment_text([trailing]))
    raw = yaml.safe_load(text) or {}
    defaults = raw.pop("defaults", []) if isinstance(raw, dict) else []
    values = flatten(raw, prefix)
    return ConfFile(comment_text(header), notes, values, defaults or [], global_package)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defaults_list(conf: Path) -> dict[str, str | None]:
    """Each group of config.yaml's defaults list and its default option (None: none)."""
    import yaml

    chosen: dict[str, str | None] = {}
    for entry in yaml.safe_load((conf / "config.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({str(k): v for k, v in entry.items()})
    return chosen


def _section_fields() -> dict[str, dict[str, Any]]:
    """Each config section's dataclass fields and their defaults (a field no conf/ file sets
    is still accepted, with ``+section.key=value``)."""
    from fedllm.config import AuditConfig, ExperimentConfig

    types = {**typing.get_type_hints(ExperimentConfig), "audit": AuditConfig}
    sections: dict[str, dict[str, Any]] = {}
    for name, cls in types.items():
        if not hasattr(cls, "__dataclass_fields__"):
            continue
        sections[name] = {f.name: _field_default(f) for f in fields(cls)}
    return sections


def _field_default(item: Field) -> Any:
    if item.default is not MISSING:
        return item.default
    factory: Any = item.default_factory
    return factory() if callable(factory) else None


def build_reference(conf: Path) -> Reference:
    """Read every file of ``conf`` and compose every group option with Hydra."""
    from omegaconf import OmegaConf

    from fedllm.config import compose_hydra

    chosen = _defaults_list(conf)
    composed = OmegaConf.to_container(compose_hydra([], conf), resolve=False)
    assert isinstance(composed, dict)
    top = parse_conf_file(conf / "config.yaml", "")
    groups = []
    folders = sorted(p.name for p in conf.iterdir() if p.is_dir() and any(p.glob("*.yaml")))
    order = [*chosen, *(name for name in folders if name not in chosen)]
    for name in order:
        folder = conf / name
        if not folder.is_dir():
            continue
        options = {p.stem: parse_conf_file(p, name) for p in sorted(folder.glob("*.yaml"))}
        group = Group(name, chosen.get(name), options)
        if group.default is not None and isinstance(composed.get(name), dict):
            for option in options:
                section = (
                    composed
                    if option == group.default
                    else OmegaConf.to_container(compose_hydra([f"{name}={option}"], conf), resolve=False)
                )
                assert isinstance(section, dict)
                group.section[option] = flatten(section[name])
        groups.append(group)
    top_values = {str(k): v for k, v in composed.items() if not isinstance(v, dict) and k not in SKIPPED_TOP_LEVEL}
    return Reference(top, top_values, groups, _section_fields())


def show(value: Any) -> str:
    """A value as one would write it in an override."""
    if value is None:
        return "null"
    if value == "???":
        return "required"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value and not 1e-3 <= abs(value) < 1e6:  # 1e-5, as the YAML says, not 1e-05
            return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:g}")
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = re.fullmatch(r"[\w./:@+-]+", text) and text not in ("null", "true", "false") and not _is_number(text)
    return text if plain else json.dumps(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def code(value: Any) -> str:
    """``value`` as inline code in a table cell."""
    return "`" + show(value).replace("|", "\\|") + "`"


def escape(text: str) -> str:
    """Markdown table-cell text: pipes escaped, and `<` outside code spans (not an HTML tag)."""
    parts = text.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


def meaning(group: Group, key: str) -> Note:
    """A key's note: from the default option first, then the others in order."""
    names = sorted(group.options, key=lambda o: (o != group.default, o))
    for name in names:
        note = group.options[name].notes.get(key)
        if note and (note.text or note.shared_with):
            return note
    return Note()


def section_keys(group: Group, ref: Reference) -> list[str]:
    """Every key of the group's section: composed ones (default option's order first), then
    dataclass fields no option sets."""
    keys: list[str] = []
    for option in sorted(group.section, key=lambda o: o != group.default):
        keys += [k for k in group.section[option] if k not in keys]
    return keys + [f for f in ref.fields.get(group.name, {}) if f not in keys]


def missing_descriptions(ref: Reference) -> list[str]:
    """Full paths of the keys no comment in conf/ describes."""
    missing = [k for k in ref.top_values if not ref.top.notes.get(k, Note()).text]
    for group in ref.groups:
        if group.section:
            missing += [
                f"{group.name}.{k}"
                for k in section_keys(group, ref)
                if not meaning(group, f"{group.name}.{k}").text and not meaning(group, f"{group.name}.{k}").shared_with
            ]
    return missing


def _default_cell(group: Group, key: str, ref: Reference) -> str:
    values = {option: section.get(key, MISSING) for option, section in group.section.items()}
    assert group.default is not None
    base = values.get(group.default, MISSING)
    if all(value is MISSING for value in values.values()):  # a dataclass field no conf/ file sets
        return code(ref.fields[group.name][key]) + f" (not in conf/: set it with `+{group.name}.{key}=...`)"
    cell = code(base) if base is not MISSING else "not set"
    others = [
        f"`{option}`: " + code(value)
        for option, value in values.items()
        if option != group.default and value is not MISSING and value != base
    ]
    return cell + (f" ({'; '.join(others)})" if others else "")


def _meaning_cell(group: Group, key: str) -> str:
    note = meaning(group, key)
    if note.text:
        return escape(note.text)
    if note.shared_with:
        return f"See `{note.shared_with}` above."
    return "(no description yet)"


def _option_rows(group: Group) -> list[str]:
    rows = ["| option | what it is |", "|---|---|"]
    for name, conf_file in group.options.items():
        extra = []
        for entry in conf_file.defaults:
            if isinstance(entry, str) and entry != "_self_":
                extra.append(f"Extends `{group.name}={entry}`.")
            elif isinstance(entry, dict):
                extra += [f"Selects `{k.split('/')[-1]}={v}`." for k, v in entry.items()]
        label = f"**`{name}`** (default)" if name == group.default else f"`{name}`"
        rows.append(f"| {label} | {escape(' '.join(filter(None, [conf_file.header, *extra])))} |")
    return rows


def _described(ref: Reference, path: str) -> str:
    """A key's meaning from its own group (for presets that set keys of other groups)."""
    section = path.split(".")[0]
    group = next((g for g in ref.groups if g.name == section), None)
    if group is None:
        return ""
    note = meaning(group, path)
    while note.shared_with and not note.text:
        note = meaning(group, note.shared_with)
    return note.text


def _preset_tables(group: Group, ref: Reference) -> list[str]:
    """For each option of a group of presets (or option keys outside its own section): what it sets."""
    lines: list[str] = []
    for name, conf_file in group.options.items():
        outside = {k: v for k, v in conf_file.values.items() if not k.startswith(f"{group.name}.") or not group.section}
        if not outside:
            continue
        lines += [
            "",
            f"`{group.name}={name}` also sets:" if group.section else f"`{group.name}={name}` sets:",
            "",
            "| key | value | meaning |",
            "|---|---|---|",
        ]
        for key, value in outside.items():
            own = conf_file.notes.get(key, Note()).text
            lines.append(f"| `{key}` | {code(value)} | {escape(own or _described(ref, key))} |")
    return lines


def render(ref: Reference) -> str:
    """docs/config.md's text."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {GENERATOR} from the comments in conf/: edit those, then run",
        f"     .venv/bin/python {GENERATOR}   (tests fail while this file is stale) -->",
        "",
        "Every key of the experiment config that `fedllm simulate`, `fedllm plan`, `fedllm audit` and the",
        'deployment ServerApp (`flwr run` with `overrides="..."`) compose from `conf/`, with its default',
        "and its meaning. Set a key with `SECTION.KEY=VALUE` (`privacy.target_epsilon=3`), pick a group",
        "option with `GROUP=OPTION` (`model=tiny`); `fedllm simulate --cfg job` prints the composed config.",
        "A default in parentheses is what another option of the same group sets instead.",
        "",
        "| group | options (default in bold) |",
        "|---|---|",
    ]
    for group in ref.groups:
        options = ", ".join(f"**`{o}`**" if o == group.default else f"`{o}`" for o in group.options)
        lines.append(f"| [`{group.name}`](#{group.name}) | {options}{'' if group.default else ' (none by default)'} |")
    lines += [
        "",
        "## Top level",
        "",
        "Keys of `conf/config.yaml` itself (besides its defaults list).",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, value in ref.top_values.items():
        note = ref.top.notes.get(key, Note()).text
        lines.append(f"| `{key}` | {code(value)} | {escape(note) or '(no description yet)'} |")
    for group in ref.groups:
        lines += ["", f"## {group.name}", ""]
        if group.default:
            lines += [
                f"`{group.name}=OPTION`, default `{group.default}`"
                + (f"; keys `{group.name}.KEY=VALUE`." if group.section else "."),
                "",
            ]
        else:
            lines += [f"`{group.name}=OPTION`: none by default; each option sets keys of other groups.", ""]
        lines += _option_rows(group)
        if group.section:
            lines += ["", "| key | default | meaning |", "|---|---|---|"]
            for key in section_keys(group, ref):
                path = f"{group.name}.{key}"
                lines.append(f"| `{path}` | {_default_cell(group, key, ref)} | {_meaning_cell(group, path)} |")
        lines += _preset_tables(group, ref)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, compare) the reference; say which keys lack a description."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Exit status: 0 written or up to date; 1 stale (--check)."
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the reference is stale")
    parser.add_argument("--conf", type=Path, default=ROOT / "conf", help="the Hydra config folder (default: conf/)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the reference file (default: docs/config.md)")
    args = parser.parse_args(argv)
    reference = build_reference(args.conf.resolve())
    text = render(reference)
    missing = missing_descriptions(reference)
    if missing:
        print(f"gen_config_reference: no comment in conf/ describes {', '.join(missing)}", file=sys.stderr)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"gen_config_reference: {args.out} is stale; run .venv/bin/python {GENERATOR}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
