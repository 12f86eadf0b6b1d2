from sslbackdoor.cli import main

main()
