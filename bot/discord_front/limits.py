"""Discord's limits on what a bot sends, and the clamps every outgoing reply goes through.

Discord refuses a whole message, modal or suggestion list when one part is over its limits,
and the member then sees only "This interaction failed". So the send paths of the front
(replies.py's helpers, the autocomplete handlers, the modals) pass what they send through
here, whatever text it quotes. The numbers are Discord's, named after the schema and field
of its OpenAPI description (../shared/discord-api-spec/openapi.json) that states them;
tests/test_e2e_limits.py checks them against it.

Text is cut with "…"; lists are cut to whole lines with "… and N more" (`listing`). Choices
whose value would have to be cut are dropped instead: a cut value would run something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

from bot import imaging

#: IncomingWebhookInteractionRequest.content (interaction replies, followups and edits); a
#: channel message allows no more from a bot.
CONTENT = 2000
#: RichEmbed.title / .description / .fields (items); RichEmbedField.name / .value;
#: RichEmbedFooter.text; RichEmbedAuthor.name.
EMBED_TITLE = 256
EMBED_DESCRIPTION = 4096
EMBED_FIELDS = 25
EMBED_FIELD_NAME = 256
EMBED_FIELD_VALUE = 1024
EMBED_FOOTER = 2048
EMBED_AUTHOR = 256
#: All the text of a message's embeds together (Discord's documentation; not in the spec).
EMBED_TOTAL = 6000
#: ActionRowComponentForMessageRequest.components (items per row); five rows per message.
ROW_ITEMS = 5
ACTION_ROWS = 5
#: ButtonComponentForMessageRequest.label / .custom_id.
BUTTON_LABEL = 80
CUSTOM_ID = 100
#: StringSelectComponentForMessageRequest.options (items) / .placeholder;
#: StringSelectOptionForRequest.label (also .value, .description).
SELECT_OPTIONS = 25
SELECT_PLACEHOLDER = 150
SELECT_OPTION_TEXT = 100
#: ModalInteractionCallbackRequestData.title; TextInputComponentForModalRequest.label /
#: .placeholder / .value.
MODAL_TITLE = 45
TEXT_INPUT_LABEL = 45
TEXT_INPUT_PLACEHOLDER = 100
TEXT_INPUT_VALUE = 4000
#: InteractionApplicationCommandAutocompleteCallbackStringData.choices (items);
#: ApplicationCommandOptionStringChoice.name. Discord's documentation caps a string
#: choice's value at 100 characters too.
CHOICES = 25
CHOICE_TEXT = 100

#: The pictures sdbot reads, in words, from the one list the decoder accepts.
IMAGE_FORMATS = imaging.ATTACHMENT_FORMATS_TEXT


def cut(text: str, limit: int) -> str:
    """`text` within `limit` characters, an ellipsis marking a cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def content(text: str) -> str:
    """Message content within Discord's limit."""
    return cut(text, CONTENT)


def listing(
    head: str,
    items: Sequence[str],
    *,
    sep: str = "\n",
    limit: int = CONTENT,
) -> str:
    """`head`, then as many whole `items` as fit in `limit`, then "… and N more" for the rest:
    a list is never cut in the middle of an entry."""
    text = cut(head, limit)
    for shown, item in enumerate(items):
        rest = len(items) - shown - 1
        more = f"{sep}… and {rest} more" if rest else ""
        # Room for this item, and for the note about those after it.
        lead = sep if text else ""
        if len(text) + len(lead) + len(item) + len(more) > limit:
            note = f"{lead}… and {len(items) - shown} more"
            return text + note if len(text) + len(note) <= limit else cut(text, limit)
        text += lead + item
    return text


def embed(e: discord.Embed) -> discord.Embed:
    """A copy of `e` within Discord's limits on each part, then on their total: the
    description gives way first, then the fields from the last."""
    out = e.copy()
    if out.title:
        out.title = cut(out.title, EMBED_TITLE)
    if out.description:
        out.description = cut(out.description, EMBED_DESCRIPTION)
    if out.footer.text:
        out.set_footer(text=cut(out.footer.text, EMBED_FOOTER), icon_url=out.footer.icon_url)
    if out.author.name:
        out.set_author(
            name=cut(out.author.name, EMBED_AUTHOR),
            url=out.author.url,
            icon_url=out.author.icon_url,
        )
    fields = [(f.name or "", f.value or "", bool(f.inline)) for f in out.fields][:EMBED_FIELDS]
    out.clear_fields()
    for name, value, inline in fields:
        out.add_field(
            name=cut(name, EMBED_FIELD_NAME) or "\u200b",
            value=cut(value, EMBED_FIELD_VALUE) or "\u200b",
            inline=inline,
        )
    excess = len(out) - EMBED_TOTAL
    if excess > 0 and out.description:
        out.description = cut(out.description, max(len(out.description) - excess, 1))
    while len(out) > EMBED_TOTAL and out.fields:
        out.remove_field(-1)
    return out


def view(v: discord.ui.View) -> discord.ui.View:
    """`v` with its labels and placeholders within Discord's limits (discord.py itself keeps
    to five rows of five). A custom_id is ours and routes the click: one too long is a bug,
    raised here rather than cut into another button's id."""
    for child in v.children:
        item: Any = child.item if isinstance(child, discord.ui.DynamicItem) else child
        custom_id = getattr(item, "custom_id", None)
        if custom_id is not None and len(custom_id) > CUSTOM_ID:
            raise ValueError(f"custom_id {custom_id[:40]!r}… is over {CUSTOM_ID} characters")
        if isinstance(item, discord.ui.Button) and item.label:
            item.label = cut(item.label, BUTTON_LABEL)
        if isinstance(item, discord.ui.Select):
            if item.placeholder:
                item.placeholder = cut(item.placeholder, SELECT_PLACEHOLDER)
            item.options = [_option(o) for o in item.options[:SELECT_OPTIONS]]
    return v


def _option(option: discord.SelectOption) -> discord.SelectOption:
    option.label = cut(option.label, SELECT_OPTION_TEXT)
    option.value = cut(option.value, SELECT_OPTION_TEXT)
    if option.description:
        option.description = cut(option.description, SELECT_OPTION_TEXT)
    return option


def modal(m: discord.ui.Modal) -> discord.ui.Modal:
    """`m` with its title, labels, placeholders and values within Discord's limits."""
    m.title = cut(m.title, MODAL_TITLE)
    for child in m.children:
        inputs: list[Any] = [child]
        if isinstance(child, discord.ui.Label):
            child.text = cut(child.text, TEXT_INPUT_LABEL) or "…"
            if child.description:
                child.description = cut(child.description, TEXT_INPUT_PLACEHOLDER)
            inputs = [child.component]
        for item in inputs:
            if isinstance(item, discord.ui.TextInput):
                _text_input(item)
    return m


def _text_input(item: discord.ui.TextInput[Any]) -> None:
    # A TextInput's own label (deprecated for discord.ui.Label, which the local server's
    # modals do not read yet) warns on every access: read from the payload, set only to cut.
    label = item.to_component_dict().get("label")
    if label is not None and not 1 <= len(label) <= TEXT_INPUT_LABEL:
        item.label = cut(label, TEXT_INPUT_LABEL) or "…"
    if item.placeholder:
        item.placeholder = cut(item.placeholder, TEXT_INPUT_PLACEHOLDER)
    most = min(item.max_length or TEXT_INPUT_VALUE, TEXT_INPUT_VALUE)
    item.max_length = most
    if item.default:
        item.default = item.default[:most]


def choices(found: Sequence[app_commands.Choice[str]]) -> list[app_commands.Choice[str]]:
    """At most 25 suggestions, each named within 100 characters; one whose value is empty or
    over 100 characters is left out, as Discord would refuse the whole list for it."""
    out: list[app_commands.Choice[str]] = []
    for choice in found:
        value = str(choice.value)
        if not 1 <= len(value) <= CHOICE_TEXT:
            continue
        name = cut(" ".join(choice.name.split()), CHOICE_TEXT) or value
        out.append(app_commands.Choice(name=name, value=value))
        if len(out) == CHOICES:
            break
    return out
