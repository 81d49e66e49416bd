"""/apikey create | list | revoke: a member's keys for the bot's AUTOMATIC1111-compatible
HTTP API (bot/http_api). A key acts as its owner in this server, under the same rules as
their commands. Every reply is ephemeral; a new key is shown once, alone in a code block,
and only its hash is stored.

Keys do not outlive their place: members with Manage Server revoke another member's keys
with `/apikey revoke member:` (checked again here, as /config is: clients can be modified),
and a member's keys are revoked when they leave the server (`on_raw_member_remove`; Discord
sends that event only to bots with the Server Members intent).
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot.db import ApiKey
from bot.db.api_keys import MAX_KEYS_PER_MEMBER
from bot.discord_front import limits
from bot.discord_front.options import check_lengths, matching
from bot.discord_front.policy import manages_guild, member_of
from bot.discord_front.replies import echo, respond
from bot.discord_front.services import Services, services
from bot.errors import InvalidRequest
from bot.rules import Refused, check_member

KeyName = app_commands.Range[str, 1, 40]
KeyRef = app_commands.Range[str, 1, 100]


def _describe(key: ApiKey) -> str:
    name = f" **{echo(key.name, 40)}**" if key.name else ""
    used = f", last used {key.last_used[:16].replace('T', ' ')}" if key.last_used else ""
    return f"`{key.prefix}…`{name} (#{key.id}), made {key.created_at[:10]}{used}"


@app_commands.guild_only()
class ApiKeys(app_commands.Group, name="apikey", description="Keys for sdbot's HTTP API"):
    @app_commands.command(name="create", description="Make a key for the HTTP API (shown once)")
    @app_commands.describe(name="A name to tell this key apart, e.g. the tool that uses it")
    async def create(self, interaction: discord.Interaction, name: KeyName | None = None) -> None:
        check_lengths(interaction)
        guild_id = interaction.guild_id
        if guild_id is None:
            raise InvalidRequest("API keys belong to a server: run /apikey in one.")
        svc = services(interaction)
        config = await svc.guild_configs.get(guild_id)
        if not config.api_enabled:
            raise Refused("api_disabled", "The admins of this server have turned sdbot's API off.")
        # The key acts as this member here, in this channel: only where they could ask.
        await check_member(svc, config, member_of(interaction))
        if len(await svc.db.api_keys_of(guild_id, interaction.user.id)) >= MAX_KEYS_PER_MEMBER:
            raise InvalidRequest(
                f"You have {MAX_KEYS_PER_MEMBER} keys here, the most one member may have; "
                "revoke one with /apikey revoke first."
            )
        key, row = await svc.db.create_api_key(
            guild_id=guild_id,
            user_id=interaction.user.id,
            user_name=str(interaction.user),
            channel_id=interaction.channel_id,
            # A thread's parent counts for the channel allow-list, as for commands there.
            parent_channel_id=member_of(interaction).parent_channel_id,
            name=(name or "").strip(),
        )
        await respond(
            interaction,
            f"Your API key{' **' + echo(row.name, 40) + '**' if row.name else ''} "
            f"(#{row.id}). Copy it now: it is not shown again.\n"
            f"```\n{key}\n```\n"
            "Send it as the password of HTTP Basic auth (any user name), as A1111 clients' "
            "API auth setting does, or as `Authorization: Bearer <key>`. It acts as you, here, "
            "under this server's rules. Revoke it with `/apikey revoke`.",
        )

    @app_commands.command(name="list", description="Your keys for the HTTP API in this server")
    async def list_(self, interaction: discord.Interaction) -> None:
        guild_id = interaction.guild_id
        if guild_id is None:
            raise InvalidRequest("API keys belong to a server: run /apikey in one.")
        keys = await services(interaction).db.api_keys_of(guild_id, interaction.user.id)
        if not keys:
            await respond(interaction, "You have no API keys here. Make one with `/apikey create`.")
            return
        await respond(
            interaction, limits.listing("**Your API keys here**", [_describe(k) for k in keys])
        )

    @app_commands.command(name="revoke", description="Revoke a key at once")
    @app_commands.describe(
        key="The key's #id, name, the start shown by /apikey list, or the key",
        member="Manage Server: revoke this member's keys (all of them, unless `key` names one)",
    )
    async def revoke(
        self,
        interaction: discord.Interaction,
        key: KeyRef | None = None,
        member: discord.User | None = None,
    ) -> None:
        check_lengths(interaction)
        guild_id = interaction.guild_id
        if guild_id is None:
            raise InvalidRequest("API keys belong to a server: run /apikey in one.")
        db = services(interaction).db
        if member is not None and member.id != interaction.user.id:
            if not manages_guild(interaction):
                raise Refused(
                    "permission", "You need the Manage Server permission to revoke others' keys."
                )
            await self._revoke_members(interaction, member, key)
            return
        if key is None:
            raise InvalidRequest("Name the key to revoke; /apikey list shows yours.")
        revoked = await db.revoke_api_key(guild_id, interaction.user.id, _key_ref(key))
        if revoked is None:
            raise InvalidRequest("You have no such key here; /apikey list shows yours.")
        await respond(interaction, f"🗑️ Revoked {_describe(revoked)}. It stops working now.")

    async def _revoke_members(
        self, interaction: discord.Interaction, member: discord.User, key: str | None
    ) -> None:
        """An admin revokes another member's keys here: one, or all of them."""
        assert interaction.guild_id is not None
        db = services(interaction).db
        who = discord.utils.escape_mentions(echo(str(member), 40))
        if key is not None:
            one = await db.revoke_api_key(interaction.guild_id, member.id, _key_ref(key))
            if one is None:
                raise InvalidRequest(f"{who} has no such key here.")
            revoked = [one]
        else:
            revoked = await db.revoke_member_api_keys(interaction.guild_id, member.id)
        if not revoked:
            await respond(interaction, f"{who} has no API keys here.")
            return
        await respond(
            interaction,
            limits.listing(
                f"🗑️ Revoked {len(revoked)} of {who}'s API keys; they stop working now.",
                [_describe(k) for k in revoked],
            ),
        )

    @revoke.autocomplete("key")
    async def _key_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        # An admin who chose a member sees that member's keys; anyone else only their own.
        chosen = getattr(interaction.namespace, "member", None)
        owner = interaction.user.id
        if isinstance(chosen, (discord.User, discord.Member)) and manages_guild(interaction):
            owner = chosen.id
        keys = await services(interaction).db.api_keys_of(interaction.guild_id, owner)
        labels = {str(k.id): f"#{k.id} {k.prefix}… {k.name}".strip() for k in keys}
        return matching(list(labels), current, labels)


def _key_ref(key: str) -> str:
    """A key as named from /apikey list's "#id prefix… name" (its id or prefix) or typed."""
    return key.strip().removeprefix("#").removesuffix("…")


class ApiKeyCog(commands.Cog, name="API keys"):
    def __init__(self, bot: commands.Bot) -> None:
        self.bot = bot
        self.group = ApiKeys()
        bot.tree.add_command(self.group)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.group.name)

    @commands.Cog.listener()
    async def on_raw_member_remove(self, payload: discord.RawMemberRemoveEvent) -> None:
        """A member who leaves (or is kicked or banned) keeps no key that acts as them here."""
        svc = getattr(self.bot, "services", None)
        if isinstance(svc, Services):
            await svc.db.revoke_member_api_keys(payload.guild_id, payload.user.id)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(ApiKeyCog(bot))
