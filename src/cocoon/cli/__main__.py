from cocoon.cli.main import main

main()
