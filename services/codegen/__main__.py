from services.codegen.service import main

main()
