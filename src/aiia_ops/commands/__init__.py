"""Pure: the stack model -> argv lists, rendered text, decisions and plans. Nothing here
runs a process, opens a socket or writes a file; runners in host/ execute what it builds."""
