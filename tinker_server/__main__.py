from tinker_server.cli import main

main()
