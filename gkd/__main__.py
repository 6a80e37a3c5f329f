from gkd.cli import console_main

console_main()
