"""The server rules as the Discord front applies them: who asks (`member_of` an interaction),
the Discord permissions that exempt or empower a member, and the NSFW action for a channel.

The rules themselves (channel, ban, prompt length, blocked words, model and size limits,
cooldown, daily quota, the per-member queue cap) live in bot/rules.py, shared with the HTTP
API; the Discord front calls them with `member_of(interaction)`.
"""

from __future__ import annotations

from typing import Any

import discord

from bot.guild_config import GuildConfig
from bot.rules import Member
from bot.rules import nsfw_action as rules_nsfw_action


def manages_guild(interaction: discord.Interaction) -> bool:
    """Manage Server (or admin) here: server admins, exempt from cooldowns and quotas."""
    perms = interaction.permissions
    return bool(perms.manage_guild or perms.administrator)


def manages_messages(interaction: discord.Interaction) -> bool:
    """A moderator of members' messages here (Manage Messages, Manage Server or admin)."""
    perms = interaction.permissions
    return bool(perms.manage_messages or perms.manage_guild or perms.administrator)


def can_moderate(interaction: discord.Interaction, owner_id: int) -> bool:
    """The job's owner, or someone who may manage messages here."""
    return interaction.user.id == owner_id or manages_messages(interaction)


def member_of(interaction: discord.Interaction) -> Member:
    """Who asks, as the rules see them: a thread's parent channel counts for the allow-list."""
    channel = interaction.channel
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    return Member(
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        parent_channel_id=parent,
        manages_guild=manages_guild(interaction),
    )


def nsfw_action(config: GuildConfig, channel: Any) -> str:
    """allow / spoiler / block for flagged images in `channel` (bot.rules.nsfw_action)."""
    return rules_nsfw_action(config, channel_is_nsfw=bool(getattr(channel, "nsfw", False)))
