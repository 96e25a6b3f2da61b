import sys

from processes.plc_reader.reader import main

sys.exit(main())
