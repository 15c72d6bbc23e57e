"""The CLI's commands, one module each; every module lists its click commands in COMMANDS.

Modules import only click at the top; everything heavy is imported inside the commands.
"""
