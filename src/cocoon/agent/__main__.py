from cocoon.agent.main import main

main()
