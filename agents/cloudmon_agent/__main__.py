"""``python -m cloudmon_agent``: same as the ``cloudmon-agent`` command."""

from cloudmon_agent.cli import main

raise SystemExit(main())
