"""The Discord front: the bot, its replies, buttons, option parsing and server rules.

It knows the backend only through `bot.backend` (the contract) and never imports the
executor or the engine; cogs/ sit on top of it.
"""
