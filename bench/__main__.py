# SPDX-License-Identifier: Apache-2.0
from bench.cli import main

raise SystemExit(main())
